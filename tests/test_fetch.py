"""dlmuse_bids.fetch and ``dlmuse models``: the real download code against a loopback server."""

from __future__ import annotations

import socket
import threading

import pytest

from dlmuse_bids import fetch
from dlmuse_bids.cli import dlmuse_main
from dlmuse_bids.cli.models_cmd import model_sources, offline_reason
from dlmuse_bids.fetch import ensure_models
from dlmuse_bids.models import ModelNotFoundError, find_model, load_trained_model
from tests.conftest import needs_shared, synthetic_head
from tests.support.hfserver import FakeHub, HubServer, manifest_of

pytestmark = needs_shared


@pytest.fixture
def hub(tiny_models):
    """A loopback 'HuggingFace' serving the tiny test models under the official paths."""
    manifest, served = manifest_of(tiny_models, fetch.official_files())
    state = FakeHub(served)
    with HubServer(state) as server:
        yield server, manifest


def _checkpoints(manifest):
    return [m for m in manifest if m.sha256 is not None]


def _url_path(item):
    return f"/{item.repo}/resolve/main/{item.path}"


def test_fetch_installs_loadable_models(hub, tmp_path):
    server, manifest = hub
    dest = tmp_path / "models"
    fetched = fetch.fetch_models(dest, endpoint=server.endpoint, files=manifest)
    assert len(fetched) == len(manifest) == 6
    assert fetch.verify_models(dest, manifest) == []
    for key in ("DLICV", "DLMUSE"):
        model = load_trained_model(find_model(key, [dest]))
        assert model.folds == [0]
    assert not list(dest.rglob("*.part"))
    # a second fetch finds everything in place and downloads nothing
    assert fetch.fetch_models(dest, endpoint=server.endpoint, files=manifest) == []
    assert max(server.hub.gets.values()) == 1


def test_resume_after_a_cut_connection(hub, tmp_path):
    server, manifest = hub
    for item in _checkpoints(manifest):
        server.hub.cut_once.add(_url_path(item))
    dest = tmp_path / "models"
    fetch.fetch_models(dest, endpoint=server.endpoint, files=manifest)
    assert fetch.verify_models(dest, manifest) == []
    resumed = {path for path, header in server.hub.ranges if header != "bytes=0-"}
    assert resumed == {_url_path(item) for item in _checkpoints(manifest)}


def test_resume_from_a_previous_partial_file(hub, tmp_path):
    server, manifest = hub
    item = _checkpoints(manifest)[0]
    dest = tmp_path / "models"
    part = dest / (item.dest + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(server.hub.files[_url_path(item)][:1000])
    fetch.fetch_models(dest, endpoint=server.endpoint, files=manifest)
    assert (_url_path(item), "bytes=1000-") in server.hub.ranges
    assert fetch.verify_models(dest, manifest) == []


def test_wrong_checksum_fails_loudly_and_leaves_nothing(hub, tmp_path):
    server, manifest = hub
    bad = _checkpoints(manifest)[1]
    server.hub.corrupt.add(_url_path(bad))
    dest = tmp_path / "models"
    with pytest.raises(fetch.ChecksumError, match="sha256"):
        fetch.fetch_models(dest, endpoint=server.endpoint, files=manifest)
    assert not (dest / bad.dest).exists()
    assert not list(dest.rglob("*.part"))


def test_server_down(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    item = fetch.RemoteFile("nichart/DLICV", "x.json", "x.json")
    with pytest.raises(fetch.FetchError, match="cannot connect"):
        fetch.download(f"http://127.0.0.1:{port}/x.json", tmp_path / "x.json", item)


def test_concurrent_fetches_share_one_download(hub, tmp_path):
    server, manifest = hub
    server.hub.delay = 0.01
    dest = tmp_path / "models"
    errors = []

    def job():
        try:
            fetch.fetch_models(dest, endpoint=server.endpoint, files=manifest)
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert fetch.verify_models(dest, manifest) == []
    assert set(server.hub.gets.values()) == {1}  # the lock made the others wait, then reuse


def test_offline_rules():
    assert offline_reason(False, {}) is None
    assert offline_reason(True, {}) == "--offline"
    assert offline_reason(False, {"DLMUSE_OFFLINE": "1"}) == "DLMUSE_OFFLINE=1"
    assert offline_reason(False, {"HF_HUB_OFFLINE": "1"}) == "HF_HUB_OFFLINE=1"
    assert offline_reason(False, {"HF_HUB_OFFLINE": "0"}) is None
    assert "container" in offline_reason(False, {"DLMUSE_BIDS_CONTAINER": "docker:x:1"})


def test_first_use_fetches_only_when_allowed(hub, tmp_path, monkeypatch):
    server, manifest = hub
    monkeypatch.setattr(fetch, "official_files", lambda: manifest)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_ENDPOINT": server.endpoint}
    said = []
    with pytest.raises(ModelNotFoundError, match="Not downloading them: --offline"):
        ensure_models(model_sources(None, True, env), say=said.append)
    with pytest.raises(ModelNotFoundError, match="container"):
        ensure_models(model_sources(None, False, {**env, "APPTAINER_CONTAINER": "/x.sif"}))
    with pytest.raises(ModelNotFoundError):  # an explicit --model-dir is never filled in
        ensure_models(model_sources(tmp_path / "mine", False, env))
    assert not server.hub.gets and not said
    dirs = ensure_models(model_sources(None, False, env), say=said.append)
    assert any("non-commercial" in line for line in said), said  # the licence is said
    assert find_model("DLMUSE", dirs).is_relative_to(tmp_path / "cache")


def test_dlmuse_models_commands(hub, tmp_path, monkeypatch, capsys):
    server, manifest = hub
    monkeypatch.setattr(fetch, "official_files", lambda: manifest)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DLMUSE_MODEL_DIR", raising=False)
    dest = tmp_path / "models"
    assert dlmuse_main(["models", "fetch", "--dest", str(dest)]) == 0
    err = capsys.readouterr().err
    assert "non-commercial" in err and "models ready (6 file(s) downloaded)" in err
    assert dlmuse_main(["models", "verify", str(dest)]) == 0
    ckpt = dest / _checkpoints(manifest)[0].dest
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert dlmuse_main(["models", "verify", str(dest)]) == 65
    assert "sha256" in capsys.readouterr().err
    monkeypatch.setenv("DLMUSE_MODEL_DIR", str(dest))
    assert dlmuse_main(["models", "path"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == str(dest)
    assert "DLICV: " in out.err
    server.hub.corrupt.add(_url_path(_checkpoints(manifest)[0]))
    assert dlmuse_main(["models", "fetch", "--dest", str(dest)]) == 65
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert dlmuse_main(["models", "fetch", "--dest", str(tmp_path / "other")]) == 69


def test_dlmuse_run_fetches_on_first_use(hub, tmp_path, monkeypatch):
    server, manifest = hub
    monkeypatch.setattr(fetch, "official_files", lambda: manifest)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DLMUSE_MODEL_DIR", raising=False)
    for var in ("DLMUSE_OFFLINE", "HF_HUB_OFFLINE", "DLMUSE_BIDS_CONTAINER"):
        monkeypatch.delenv(var, raising=False)
    import nibabel as nib

    head = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(synthetic_head(), head)
    out = tmp_path / "out"
    assert dlmuse_main(["run", str(head), "-o", str(out), "--offline", "--no-tta"]) == 66
    assert dlmuse_main(["run", str(head), "-o", str(out), "--no-tta"]) == 0
    assert (out / "sub-01_T1w_DLMUSE.nii.gz").is_file()
    assert sum(server.hub.gets.values()) == 6


def test_a_damaged_fetched_checkpoint_is_refused_before_loading(
    hub, tmp_path, monkeypatch, capsys
):
    """Truncated or altered after the fetch: refused unloaded, saying how to fetch it again."""
    import json

    import torch

    from dlmuse_bids.cli.bids_app import main as bids_main
    from dlmuse_bids.models import OFFICIAL_MARKER, ModelError
    from tests.support.bids import STANDARD_T1W, make_dataset

    server, manifest = hub
    dest = tmp_path / "models"
    fetch.fetch_models(dest, endpoint=server.endpoint, files=manifest)
    item = _checkpoints(manifest)[0]
    ckpt = dest / item.dest
    record = json.loads((ckpt.parent.parent / OFFICIAL_MARKER).read_text())
    assert record["repo"] == item.repo
    assert (record["size"], record["sha256"]) == (item.size, item.sha256)
    data = ckpt.read_bytes()
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    for damaged, why in (
        (data[:-1000], "bytes"),
        (data[:-1] + bytes([data[-1] ^ 0xFF]), "sha256"),
    ):
        ckpt.write_bytes(damaged)
        with pytest.raises(ModelError) as info:
            load_trained_model(ckpt.parent.parent)
        message = str(info.value)
        assert message.startswith(f"{ckpt}: ") and why in message and "\n" not in message
        assert "dlmuse models fetch" in message
    assert not loads
    raw = make_dataset(tmp_path / "raw", [STANDARD_T1W[3]])
    argv = [str(raw), str(tmp_path / "out"), "participant", "--model-dir", str(dest)]
    assert bids_main([*argv, "--skip-bids-validation"], env={}) == 66
    assert "dlmuse models fetch" in capsys.readouterr().err
    assert not (tmp_path / "out" / "sub-02").exists()


@pytest.fixture
def nichart_server():
    """A loopback 'GitHub raw' serving NiChart's tables at the pinned commit."""
    from dlmuse_bids.norms import NICHART_COMMIT, NICHART_FILES, NICHART_REPO
    from tests.support.paths import NICHART_NORMS

    if not NICHART_NORMS.is_dir():
        pytest.skip(f"NiChart's tables not found at {NICHART_NORMS}")
    served = {
        f"/{NICHART_REPO}/{NICHART_COMMIT}/{path}": (NICHART_NORMS / name).read_bytes()
        for name, (path, _, _) in NICHART_FILES.items()
    }
    with HubServer(FakeHub(served)) as server:
        yield server


def test_norms_fetch_verify_and_first_use(nichart_server, tmp_path, monkeypatch, capsys):
    from dlmuse_bids.cli.models_cmd import norms_sources
    from dlmuse_bids.norms import NORM_FILES
    from dlmuse_bids.runner.centiles import resolve_norms

    server = nichart_server
    monkeypatch.setenv("DLMUSE_NORMS_ENDPOINT", server.endpoint)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DLMUSE_NORMS_DIR", raising=False)
    dest = tmp_path / "norms"
    assert dlmuse_main(["norms", "fetch", "--dest", str(dest)]) == 0
    err = capsys.readouterr().err
    assert "non-commercial" in err and "tables ready (5 file(s) downloaded)" in err
    assert sorted(p.name for p in dest.glob("*.csv")) == sorted(NORM_FILES)
    assert dlmuse_main(["norms", "verify", str(dest)]) == 0
    table = dest / NORM_FILES[0]
    table.write_bytes(table.read_bytes()[:-1])
    assert dlmuse_main(["norms", "verify", str(dest)]) == 65
    assert "size" in capsys.readouterr().err
    assert dlmuse_main(["norms", "fetch", "--dest", str(dest)]) == 0  # mends the one file
    assert "(1 file(s) downloaded)" in capsys.readouterr().err
    # first use: fetched into the per-user cache unless offline; --norms-dir is never filled
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "DLMUSE_NORMS_ENDPOINT": server.endpoint}
    said: list[str] = []
    assert resolve_norms(norms_sources(None, True, env), said.append) is None
    assert len(said) == 1 and "not downloading them: --offline" in said[0]
    assert resolve_norms(norms_sources(tmp_path / "mine", False, env), said.append) is None
    before = sum(server.hub.gets.values())
    norms = resolve_norms(norms_sources(None, False, env), said.append)
    assert norms is not None and norms.pinned
    assert norms.directory == tmp_path / "cache" / "dlmuse-bids" / "norms"
    assert sum(server.hub.gets.values()) - before == 5
    # a corrupted transfer is refused, deleted, and said in one line
    server.hub.corrupt.add(next(iter(server.hub.files)))
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache2")
    said.clear()
    assert resolve_norms(norms_sources(None, False, env), said.append) is None
    assert "fetching NiChart's tables failed" in said[-1] and "sha256" in said[-1]
    assert not list((tmp_path / "cache2").rglob("*.part"))
