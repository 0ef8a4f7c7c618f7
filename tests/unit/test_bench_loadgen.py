"""The benchmark generator's Socket.IO adapter: what it answers, what it counts, and what it never hides."""

from loadtest.bench.loadgen import Fleet, SocketIOMember


class FakeWire:
    open = True
    closing = False

    def __init__(self):
        self.sent: list[str] = []

    def send_text(self, text: str) -> None:
        self.sent.append(text)


async def test_the_socketio_adapter_joins_answers_pings_and_feeds_deliveries_to_the_ledger():
    fleet = Fleet("http://127.0.0.1:8080", wire="socketio")
    member = SocketIOMember(fleet, "room-1")
    fleet.rooms["room-1"] = [member]
    wire = FakeWire()
    member.on_open(wire)
    assert member.path("room-1") == "/ws/chat/room-1/?EIO=4&transport=websocket"

    member.on_text(b'0{"sid":"x","upgrades":[],"pingInterval":20000,"pingTimeout":30000}', 1.0)
    assert wire.sent == ["40"]  # Engine.IO open: join the default namespace
    member.on_text(b'40{"sid":"y"}', 1.0)
    member.on_text(b'42["welcome",{"type":"welcome","room":"room-1","pod":"daphne-2"}]', 1.0)
    assert member.pod == "daphne-2" and member.welcomed.done()
    member.on_text(b"2", 1.0)
    assert wire.sent[-1] == "3"  # Engine.IO ping answered with a pong

    member.client = wire
    member.publish(7)
    assert wire.sent[-1].startswith('42["message",{"message":"benchmark message ') and '"id":7' in wire.sent[-1]
    sent_at = fleet.ledger.sent_at[7]
    delivery = '{"type":"chat.message","message":"m","id":7,"sent_at":%r,"origin":"daphne-1"}' % sent_at
    member.on_text(f'42["chat.message",{delivery}]'.encode(), sent_at + 0.004)
    # served_by, which python-socketio's manager cannot set, is the replica that welcomed the socket.
    assert fleet.ledger.received == 1 and fleet.ledger.pairs == {("daphne-1", "daphne-2"): 1}
    assert fleet.ledger.latency_ms(100) == 4.0

    member.on_text(b'42["error",{"type":"error","code":"bad_schema","detail":"no"}]', 2.0)
    member.on_text(b'44{"message":"refused"}', 2.0)
    member.on_text(b"41", 2.0)
    assert fleet.errors["bad_schema"] == 1 and sum(fleet.errors.values()) == 3
