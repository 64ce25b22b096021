"""The TLS reverse proxy in front of a SuperLink: an nginx configuration that exposes only the
Fleet API (what SuperNodes call) on the client-facing address and answers everything else, the
Control API included, with 403; and where to find nginx."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["find_nginx", "proxy_config"]


def proxy_config(
    *,
    listen: str,
    superlink_port: int,
    certs: dict[str, Path],
    work_dir: Path,
) -> str:
    """An nginx configuration that exposes only the SuperLink's Fleet API (`/v1/fleet/`, what
    SuperNodes call) on the client-facing address `listen` ("IP:PORT"), over TLS with the
    SuperLink's certificate, and forwards it to the SuperLink on 127.0.0.1:`superlink_port`,
    verifying the SuperLink's certificate. Every other path, the Control API (`/v1/control/`,
    where `flwr supernode register` and `flwr run` go) included, is answered 403. Logs, pid and
    temporary files go under `work_dir`. Run it with `nginx -p WORK_DIR -c FILE`."""
    tmp = work_dir / "nginx-tmp"
    user = "user root root;\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    return f"""# fedhello: the client-facing side of a SuperLink (docs/flower.md, "Authenticated deployment")
{user}worker_processes 1;
pid {work_dir / "nginx.pid"};
error_log {work_dir / "logs" / "proxy-error.log"} warn;
events {{ worker_connections 512; }}
http {{
    access_log {work_dir / "logs" / "proxy-access.log"};
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    client_max_body_size 0;             # adapters and models may be large
    server {{
        listen {listen} ssl;
        ssl_certificate {certs["cert"]};
        ssl_certificate_key {certs["key"]};
        location /v1/fleet/ {{             # SuperNodes: register, pull and push messages, FABs
            proxy_pass https://127.0.0.1:{superlink_port};
            proxy_ssl_trusted_certificate {certs["ca"]};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location / {{ return 403; }}       # the Control API and anything else: not from here
    }}
}}
"""


def find_nginx() -> str | None:
    """The nginx binary (Debian's `nginx` package), or None."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None
