"""The one nginx config: each way of running renders the same template, and nginx accepts every rendering."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from realtime import command_line

from deploy import render_nginx
from deploy.render_nginx import TEMPLATE, render, values_for
from deploy.stack import LocalStack, nginx_binary

REPO = Path(__file__).resolve().parents[2]


def directives(text: str) -> str:
    """The config without its comments."""
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def nginx_t(text: str, tmp_path: Path) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text(text)
    result = subprocess.run(
        [nginx_binary(), "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_the_local_stack_rendering_passes_nginx_t(tmp_path):
    stack = LocalStack(replicas=3)  # renders its config without starting anything
    text = stack.nginx_config(tmp_path)
    for port in stack.replica_ports.values():
        assert f"server 127.0.0.1:{port} " in text
    assert f"server 127.0.0.1:{stack.gunicorn_port};" in text
    assert f"listen {stack.port};" in text
    nginx_t(text, tmp_path)


def test_a_compose_like_rendering_resolves_the_pool_while_running_and_passes_nginx_t(tmp_path):
    # Compose and Kubernetes name the pool (daphne:8000, the headless
    # Service), which only their DNS resolves: nginx must not resolve it at
    # load (`nginx -t` here would fail on it), only per handshake, through the
    # resolver. gunicorn's name is resolved at load: `localhost` stands in.
    output = tmp_path / "nginx.conf"
    argv = ["--port", "8080", "--runtime-dir", str(tmp_path), "--gunicorn", "localhost:8001", "-o", str(output)]
    assert render_nginx.main([*argv, "--daphne-dns-name", "daphne.invalid:8000", "--resolver", "127.0.0.11 ::1"]) == 0
    config = directives(output.read_text())
    assert "resolver 127.0.0.11 [::1] valid=5s;" in config
    assert "upstream daphne" not in config
    assert 'set $daphne_pool "daphne.invalid:8000";' in locations(config)["/ws/"]
    assert "proxy_pass http://$daphne_pool;" in locations(config)["/ws/"]
    nginx_t(output.read_text(), tmp_path)


def test_the_resolver_can_come_from_resolv_conf(tmp_path):
    text = render(
        values_for(port=1, runtime_dir="/x", daphne_dns_name="daphne:8000", gunicorn=["b:2"], resolver="auto")
    )
    nameservers = re.findall(r"^nameserver\s+(\S+)", Path("/etc/resolv.conf").read_text(), re.M)
    bracketed = [f"[{address}]" if ":" in address else address for address in nameservers]
    assert f"resolver {' '.join(bracketed)} valid=5s;" in text


def test_a_rendering_fills_every_placeholder_and_keeps_nginx_variables():
    text = render(values_for(port=8080, runtime_dir="/run/nginx", daphne=["a:1", "b:2"], gunicorn=["c:3"]))
    assert not re.search(r"\$\{[A-Z_]+\}", text)
    for variable in ("$http_upgrade", "$connection_upgrade", "$remote_addr", "$binary_remote_addr", "$host"):
        assert variable in text


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"GUNICORN_ADDRESSES": "b:2"}, "set DAPHNE_DNS_NAME"),
        ({"DAPHNE_ADDRESSES": "a:1", "DAPHNE_DNS_NAME": "d:1", "GUNICORN_ADDRESSES": "b:2"}, "both set"),
        ({"DAPHNE_DNS_NAME": "daphne", "GUNICORN_ADDRESSES": "b:2"}, "needs a port"),
        ({"DAPHNE_DNS_NAME": "d:1", "GUNICORN_ADDRESSES": "b:2", "NGINX_RESOLVER": ""}, "needs NGINX_RESOLVER"),
        ({"DAPHNE_ADDRESSES": "a:1", "GUNICORN_ADDRESSES": ""}, "GUNICORN_ADDRESSES is empty"),
        ({"DAPHNE_ADDRESSES": "a:1", "GUNICORN_ADDRESSES": "b:2", "NGINX_TLS_CERTIFICATE": "/c"}, "go together"),
        ({"DAPHNE_ADDRESSES": "a:1", "GUNICORN_ADDRESSES": "b:2", "NGINX_REAL_IP_HEADER": "X-Client"}, "use X-Fo"),
        (
            {"DAPHNE_ADDRESSES": "a:1", "GUNICORN_ADDRESSES": "b:2", "NGINX_REAL_IP_HEADER": "proxy_protocol"},
            "applies to the TLS listener",
        ),
    ],
)
def test_a_missing_or_contradictory_input_is_refused_with_its_name(values, complaint):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        render(values)


def test_an_unset_input_is_refused_with_its_name(tmp_path):
    script = f"unset NGINX_RUNTIME_DIR; exec sh {render_nginx.ENTRYPOINT} render"
    environment = {**render_nginx.image_defaults(), "DAPHNE_ADDRESSES": "a:1", "GUNICORN_ADDRESSES": "b:2"}
    result = subprocess.run(["sh", "-c", script], env=environment, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "unset variables: NGINX_RUNTIME_DIR" in result.stderr


def locations(config: str) -> dict[str, str]:
    """Each location block's directives, by its match."""
    return {match.group(1).strip(): match.group(2) for match in re.finditer(r"location ([^{]+)\{([^}]*)\}", config)}


def rendered() -> str:
    return directives(render(values_for(port=1, runtime_dir="/x", daphne=["a:1"], gunicorn=["b:2"])))


def test_websocket_location_outlives_daphnes_ping():
    config = rendered()
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", locations(config)["/ws/"]).group(1))
    assert read_timeout > command_line.PING_INTERVAL_SECONDS, "an idle socket would be cut between two pings"


# What nginx must set (or clear, with "") on every proxied request: every
# header Daphne, gunicorn, Django or the app would believe from a client.
EDGE_HEADERS = {
    "Host": "$host",
    "Upgrade": "$upstream_upgrade",
    "Connection": "$upstream_connection",
    "X-Forwarded-For": "$remote_addr",
    "X-Real-IP": "$remote_addr",
    "Forwarded": '"for=$forwarded_for;proto=$client_scheme"',
    "X-Forwarded-Proto": "$client_scheme",
    "X-Forwarded-Protocol": '""',
    "X-Forwarded-Ssl": '""',
    "X-Forwarded-Host": "$host",
    "X-Forwarded-Port": "$server_port",
    "Daphne-Root-Path": '""',
    "X-Forwarded-Prefix": '""',
    "SCRIPT_NAME": '""',
    "PATH_INFO": '""',
}


def test_every_proxied_location_gets_every_edge_header_and_none_can_be_spoofed():
    config = rendered()
    server = config[config.index("server {") :]
    # A proxy_set_header in a location would replace all the server's ones there.
    for match, block in locations(config).items():
        assert "proxy_set_header" not in block, f"location {match} sets its own headers and loses the server's"
    proxied = [match for match, block in locations(config).items() if "proxy_pass" in block]
    assert sorted(proxied) == ["/", "/static/", "/ws/"]
    found = dict(re.findall(r"proxy_set_header (\S+) (.+);$", server.split("location", 1)[0], re.M))
    assert found == EDGE_HEADERS
    assert "proxy_http_version 1.1;" in server.split("location", 1)[0]
    # Daphne's --proxy-headers trusts the leftmost X-Forwarded-For.
    assert "$proxy_add_x_forwarded_for" not in config
    assert "server_tokens off;" in config


@pytest.mark.parametrize(
    "pool", [{"daphne": ["a:1", "b:2"]}, {"daphne_dns_name": "daphne.ns.svc.cluster.local:8000", "resolver": "auto"}]
)
def test_only_the_daphne_pool_is_sent_upgrades(pool):
    """gunicorn's pool keeps connections alive, and an upgrade it accepted would tunnel past nginx."""
    config = directives(render(values_for(port=1, runtime_dir="/x", gunicorn=["g:3"], **pool)))
    # $proxy_host is what /ws/ passes to: the upstream's name, or the DNS name with its port.
    sent_to = re.search(r'set \$daphne_pool "([^"]+)";', locations(config)["/ws/"]).group(1)
    assert sent_to == ("daphne" if "daphne" in pool else pool["daphne_dns_name"])
    for variable, for_daphne in (("upstream_upgrade", "$http_upgrade"), ("upstream_connection", "$connection_upgrade")):
        block = re.search(r"map \$proxy_host \$%s \{([^}]*)\}" % variable, config).group(1)
        assert dict(re.findall(r"(\S+)\s+(.+);", block)) == {f'"{sent_to}"': for_daphne, "default": '""'}
    # A WebSocket upgrade only: no h2c or other protocol reaches Daphne as an upgrade.
    assert re.search(
        r"map \$http_upgrade \$connection_upgrade \{\s+~\*\^websocket\$ upgrade;\s+default\s+close;", config
    )


def test_there_is_one_nginx_config():
    copies = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [
            name for name in subfolders if not name.startswith(".") and name not in {"build", "node_modules"}
        ]
        for name in files:
            path = Path(folder, name)
            if path != TEMPLATE and path.suffix in {".conf", ".template", ".tmpl", ".yaml", ".yml", ""}:
                if "proxy_pass http://$daphne_pool" in path.read_text(errors="ignore"):
                    copies.append(str(path.relative_to(REPO)))
    assert copies == [], f"nginx config copied outside {TEMPLATE.relative_to(REPO)}: {copies}"


def test_the_image_the_local_stack_and_the_tests_start_replicas_with_one_command_line():
    """Nobody adds options of their own: realtime.server adds production's (command_line.py)."""
    entrypoint = (REPO / "deploy" / "entrypoint.sh").read_text()
    assert re.findall(r"exec python -m realtime\.server (.*)", entrypoint) == ['--bind "$listen_host" --port 8000 "$@"']
    assert LocalStack._daphne_argv(1) == command_line.argv(sys.executable, "127.0.0.1", 1)
    assert "command_line.argv(" in (REPO / "tests" / "processes.py").read_text()
    assert command_line.complete(["--bind", "h"])[-1] == command_line.APPLICATION
    assert "--ping-interval" in command_line.complete([])
