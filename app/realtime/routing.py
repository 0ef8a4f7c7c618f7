"""WebSocket URL routes; the HTTP ones are in config/urls.py."""

from django.urls import re_path

from realtime import consumers

websocket_urlpatterns = [
    re_path(r"^ws/echo/$", consumers.EchoConsumer.as_asgi()),
    re_path(r"^ws/api/$", consumers.ApiConsumer.as_asgi()),
    # Any room segment reaches the consumer, which validates it and refuses the
    # handshake for a bad name (instead of the router raising "No route found").
    re_path(r"^ws/chat/(?P<room>[^/]+)/$", consumers.ChatConsumer.as_asgi()),
    re_path(r"", consumers.RejectConsumer.as_asgi()),
]
