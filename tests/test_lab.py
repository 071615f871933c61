"""JupyterLab with the project's configuration: a real server, checked over its REST API.

Every ``notebooks/NN_*.py`` must be served as a notebook (jupytext's contents manager) whose kernelspec names a
kernel the server has (so JupyterLab opens it with that kernel, without a dialog and without marking it
modified), and Python files must open in the "Jupytext Notebook" viewer by default.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jupyterlab")
pytest.importorskip("jupytext")

from moe_routing import lab
from moe_routing.report import ensure_kernel, find_notebooks

NOTEBOOKS = find_notebooks(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def get(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read().decode())

    def send(self, method: str, path: str, body: Any | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read().decode()
        return json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    ensure_kernel("python3")
    # a copy of the notebooks: no paired .ipynb left behind in the checkout, none from an earlier session used
    root = tmp_path_factory.mktemp("lab") / "notebooks"
    root.mkdir()
    for p in NOTEBOOKS:
        shutil.copy(p, root / p.name)
    shutil.copy(NOTEBOOKS[0].parent / "jupytext.toml", root / "jupytext.toml")
    port, token = _free_port(), secrets.token_hex(16)
    argv = lab.lab_command(root, extra=[f"--port={port}", "--no-browser", f"--IdentityProvider.token={token}",
                                        "--ServerApp.ip=127.0.0.1", "--ServerApp.allow_root=True",
                                        "--LabServerApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"])
    log = root.parent / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, env=lab.lab_environment(), stdout=fh, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                srv.get("/api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start: {log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert not list(root.glob("*.ipynb")), "opening a notebook over the API must not write a paired .ipynb"


def test_every_notebook_is_served_as_a_notebook_with_a_kernel(server: Server) -> None:
    kernels = server.get("/api/kernelspecs")["kernelspecs"]
    assert NOTEBOOKS
    for p in NOTEBOOKS:
        model = server.get(f"/api/contents/{p.name}?type=notebook&content=1")
        assert model["type"] == "notebook", p.name
        nb = model["content"]
        assert len(nb["cells"]) > 1, p.name
        spec = nb["metadata"].get("kernelspec")
        assert spec, f"{p.name} is served without a kernelspec: JupyterLab would ask for a kernel"
        assert spec["name"] in kernels, (p.name, spec, list(kernels))
        assert spec["display_name"] == kernels[spec["name"]]["spec"]["display_name"]
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]) or p.name.startswith(
            "01"
        ), p.name


def test_the_served_kernel_launches(server: Server) -> None:
    p = NOTEBOOKS[0]
    spec = server.get(f"/api/contents/{p.name}?type=notebook&content=1")["content"]["metadata"]["kernelspec"]
    session = server.send("POST", "/api/sessions", {"path": p.name, "type": "notebook", "name": p.name,
                                                   "kernel": {"name": spec["name"]}})
    try:
        assert session["kernel"]["name"] == spec["name"]
        running = {k["id"]: k for k in server.get("/api/kernels")}
        assert session["kernel"]["id"] in running  # the server launched the notebook's kernel
    finally:
        server.send("DELETE", f"/api/sessions/{session['id']}")


def test_python_files_open_as_notebooks_by_default(server: Server) -> None:
    plugin, key, filetype, viewer = lab.DEFAULT_VIEWER
    setting = server.get(f"/lab/api/settings/{plugin}")
    assert setting["schema"]["properties"][key]["default"].get(filetype) == viewer
    assert setting["settings"].get(key, {}).get(filetype, viewer) == viewer
    # the viewer is a document factory that the jupytext lab extension registers
    ext = Path(__file__).resolve().parents[1]  # the project's own config files are the source of these settings
    cfg = json.loads((ext / "jupyter" / "labconfig" / "default_setting_overrides.json").read_text())
    assert cfg[plugin][key][filetype] == viewer


def test_lab_environment_puts_the_project_config_first(tmp_path: Path) -> None:
    env = lab.lab_environment({"JUPYTER_CONFIG_PATH": str(tmp_path)})
    first, second = env["JUPYTER_CONFIG_PATH"].split(":")
    assert Path(first) == lab.config_dir() and second == str(tmp_path)
    with pytest.raises(Exception, match="does not exist"):
        lab.lab_command(tmp_path / "missing")
