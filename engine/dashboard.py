"""`crystallab dashboard`: start the Streamlit lab bound to localhost, with the 3D viewer asset in place.

The server listens on 127.0.0.1 unless told otherwise (reach it from a laptop with
``ssh -L 8501:127.0.0.1:8501 server``), runs headless and sends no usage statistics. Before starting, the
3Dmol.js asset is fetched from the npm registry into the cache if it is missing ("first start"), so viewing
structures later never needs the internet.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.settings import REPO_ROOT, get_settings
from engine.viewer import asset_status, ensure_3dmol_js

APP_PATH = REPO_ROOT / "app.py"


def streamlit_command(port: int = 8501, address: str = "127.0.0.1", base_url_path: str = "") -> list[str]:
    """The ``streamlit run`` command line that serves the lab.

    Args:
        port: TCP port.
        address: interface to bind; keep 127.0.0.1 unless the machine's network is trusted.
        base_url_path: serve under this path prefix (e.g. ``lab`` behind a reverse proxy at /lab/).
    """
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP_PATH),
        "--server.port", str(port),
        "--server.address", address,
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]
    if base_url_path.strip("/"):
        cmd += ["--server.baseUrlPath", base_url_path.strip("/")]
    return cmd


def _run(args: argparse.Namespace) -> int:
    if ensure_3dmol_js(download=not args.offline) is None:
        print(f"warning: {asset_status()}; 3D views will fall back to a simple plot", file=sys.stderr)
    settings = get_settings()
    print(f"crystallab dashboard: runs in {settings.runs_dir}; open http://{args.address}:{args.port}/"
          f"{args.base_url_path.strip('/')}", file=sys.stderr)
    cmd = streamlit_command(args.port, args.address, args.base_url_path)
    # Streamlit reads .streamlit/config.toml from the working directory: serve from the checkout.
    os.chdir(REPO_ROOT)
    os.execv(cmd[0], cmd)  # replace this process so Ctrl-C and service managers talk to Streamlit directly
    return 0  # not reached


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dashboard", help="start the Streamlit lab (127.0.0.1:8501 by default)")
    p.add_argument("--port", type=int, default=8501, help="TCP port (default 8501)")
    p.add_argument("--address", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; use an SSH tunnel to reach it remotely)")
    p.add_argument("--base-url-path", default="", help="serve under this URL path, e.g. 'lab' for /lab/")
    p.add_argument("--offline", action="store_true",
                   help="do not try to fetch 3Dmol.js from the npm registry if it is not cached")
    p.set_defaults(func=_run)
