"""The one nginx config: each way of running renders the same template, and nginx accepts every rendering."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from deploy import render_nginx
from deploy.render_nginx import TEMPLATE, render, values_for
from deploy.stack import DAPHNE_PING_INTERVAL, DAPHNE_PING_TIMEOUT, LocalStack, nginx_binary

REPO = Path(__file__).resolve().parents[2]


def directives(text: str) -> str:
    """The config without its comments."""
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def nginx_t(text: str, tmp_path: Path) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text(text)
    result = subprocess.run(
        [nginx_binary(), "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(config)],
        capture_output=True, text=True, timeout=30,
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


def test_a_compose_like_rendering_with_names_and_a_resolver_passes_nginx_t(tmp_path):
    # Compose names its upstreams daphne:8000 and gunicorn:8001, which only
    # Docker's DNS resolves, and nginx resolves upstream names while loading
    # its config, `nginx -t` included (`resolver` serves only runtime lookups).
    # `localhost` stands in: a name, not an address, resolvable anywhere; the
    # real names are exercised by the compose tests.
    output = tmp_path / "nginx.conf"
    assert render_nginx.main([
        "--port", "8080", "--runtime-dir", str(tmp_path), "--daphne", "localhost:8000",
        "--gunicorn", "localhost:8001", "--resolver", "127.0.0.11", "-o", str(output),
    ]) == 0
    text = output.read_text()
    assert "resolver 127.0.0.11 valid=5s;" in text
    assert "server localhost:8000 max_fails=0;" in text
    nginx_t(text, tmp_path)


def test_a_rendering_fills_every_placeholder_and_keeps_nginx_variables():
    text = render(values_for(port=8080, runtime_dir="/run/nginx", daphne=["a:1", "b:2"], gunicorn=["c:3"]))
    assert not re.search(r"\$\{[A-Z_]+\}", text)
    for variable in ("$http_upgrade", "$connection_upgrade", "$remote_addr", "$binary_remote_addr", "$host"):
        assert variable in text


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"NGINX_LISTEN_PORT": "8080"}, "missing"),
        ({**values_for(port=1, runtime_dir="/x", daphne=["a:1"], gunicorn=["b:2"]), "EXTRA": "1"}, "unknown ['EXTRA']"),
    ],
)
def test_a_half_filled_rendering_is_refused(values, complaint):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        render(values)


def test_an_empty_upstream_is_refused():
    with pytest.raises(ValueError, match="at least one server"):
        values_for(port=1, runtime_dir="/x", daphne=[], gunicorn=["b:2"])


def test_websocket_location_outlives_daphnes_ping_and_cannot_be_spoofed():
    config = directives(TEMPLATE.read_text())
    ws_location = config[config.index("location /ws/"):config.index("location /static/")]
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", ws_location).group(1))
    assert read_timeout > DAPHNE_PING_INTERVAL, "an idle socket would be cut between two pings"
    assert "proxy_http_version 1.1;" in ws_location
    assert "proxy_set_header Connection $connection_upgrade;" in ws_location
    # Daphne's --proxy-headers trusts the leftmost X-Forwarded-For.
    assert "$proxy_add_x_forwarded_for" not in config
    assert config.count("proxy_set_header X-Forwarded-For $remote_addr;") == 2
    assert "server_tokens off;" in config


def test_there_is_one_nginx_config():
    copies = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and name not in {"build", "node_modules"}]
        for name in files:
            path = Path(folder, name)
            if path != TEMPLATE and path.suffix in {".conf", ".template", ".tmpl", ".yaml", ".yml", ""}:
                if "proxy_pass http://daphne" in path.read_text(errors="ignore"):
                    copies.append(str(path.relative_to(REPO)))
    assert copies == [], f"nginx config copied outside {TEMPLATE.relative_to(REPO)}: {copies}"


def test_the_local_stack_pings_like_the_image():
    entrypoint = (REPO / "deploy" / "entrypoint.sh").read_text()
    assert re.findall(r"--ping-interval (\d+)", entrypoint) == [str(DAPHNE_PING_INTERVAL)]
    assert re.findall(r"--ping-timeout (\d+)", entrypoint) == [str(DAPHNE_PING_TIMEOUT)]
