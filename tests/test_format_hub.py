"""Hub ids resolved through huggingface_hub.snapshot_download against a local cache, offline."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from steer_serve.formats import load_intervention
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.hub import download_from_hub, looks_like_hub_id, split_hub_id
from steer_serve.formats.native import save_native
from steer_serve.interventions.base import Edit, Intervention, Placement

ROOT = Path(__file__).resolve().parents[1]


def make_iv(value=1.0):
    return Intervention([Edit("steering_vector", Placement(2), {"vector": torch.full((8,), value)})],
                        hidden_size=8, positions="l1", base_model="org/base")


def add_to_cache(cache: Path, repo_id: str, iv: Intervention, refs=("main",)) -> str:
    """Lay ``iv`` out like huggingface_hub does: blobs/ by hash, snapshots/<commit>/ symlinks, refs/."""
    commit = hashlib.sha1(f"{repo_id}{refs}".encode()).hexdigest()
    staging = save_native(iv, cache.parent / f"staging-{commit}")
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / commit).mkdir(parents=True)
    for f in staging.iterdir():
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        (folder / "snapshots" / commit / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_syntax():
    assert looks_like_hub_id("pyvene/reft_goody2") and looks_like_hub_id("org/name@v1.0")
    assert not looks_like_hub_id("../etc/passwd") and not looks_like_hub_id("/abs/path")
    assert not looks_like_hub_id("a/b/c") and not looks_like_hub_id("org/..")
    assert split_hub_id("org/name@main") == ("org/name", "main") and split_hub_id("org/name") == ("org/name", None)


def test_download_and_load_from_cache_offline(tmp_path, offline):
    cache = tmp_path / "hub"
    commit = add_to_cache(cache, "org/steer", make_iv(2.0))
    path = download_from_hub("org/steer", cache_dir=cache)
    assert path == cache / "models--org--steer" / "snapshots" / commit
    iv = load_intervention("org/steer", hub_cache_dir=cache, hidden_size=8, num_layers=4)
    assert torch.equal(iv.edits[0].params["vector"], torch.full((8,), 2.0))
    assert iv.positions == "l1" and iv.base_model == "org/base"


def test_revisions(tmp_path, offline):
    cache = tmp_path / "hub"
    add_to_cache(cache, "org/steer", make_iv(1.0))
    commit = add_to_cache(cache, "org/steer", make_iv(3.0), refs=("v2",))
    assert load_intervention("org/steer@v2", hub_cache_dir=cache).edits[0].params["vector"][0] == 3.0
    assert load_intervention(f"org/steer@{commit}", hub_cache_dir=cache).edits[0].params["vector"][0] == 3.0
    assert load_intervention("org/steer", hub_cache_dir=cache).edits[0].params["vector"][0] == 1.0
    with pytest.raises(InterventionFormatError, match="'org/steer@v3' is not in the local cache"):
        load_intervention("org/steer@v3", hub_cache_dir=cache)


def test_offline_miss_is_a_clear_error(tmp_path, offline):
    with pytest.raises(InterventionFormatError, match="hub repository 'org/absent' is not in the local cache") as e:
        download_from_hub("org/absent", cache_dir=tmp_path / "hub")
    assert e.value.code == "source_not_found" and e.value.param == "source"
    assert "HF_HUB_OFFLINE=0" in str(e.value.__cause__)  # huggingface_hub really ran in offline mode


def test_overrides_and_validation_apply_to_hub_sources(tmp_path, offline):
    cache = tmp_path / "hub"
    add_to_cache(cache, "org/steer", make_iv())
    iv = load_intervention("org/steer", hub_cache_dir=cache, positions="f2+l2", scale=0.5)
    assert (iv.positions, iv.scale) == ("f2+l2", 0.5)
    with pytest.raises(InterventionFormatError, match="hidden size 8 but the base model has hidden size 576"):
        load_intervention("org/steer", hub_cache_dir=cache, hidden_size=576)


def test_hub_can_be_disabled_and_local_paths_win(tmp_path, offline):
    cache = tmp_path / "hub"
    add_to_cache(cache, "org/steer", make_iv(1.0))
    allowed = tmp_path / "allowed"
    save_native(make_iv(5.0), allowed / "org" / "steer")
    with pytest.raises(InterventionFormatError, match="hub downloads are disabled"):
        load_intervention("org/other", allowed_dirs=[allowed], allow_hub=False, hub_cache_dir=cache)
    local = load_intervention("org/steer", allowed_dirs=[allowed], hub_cache_dir=cache)
    assert local.edits[0].params["vector"][0] == 5.0
    hub = load_intervention("org/steer", allowed_dirs=[tmp_path / "elsewhere"], hub_cache_dir=cache)
    assert hub.edits[0].params["vector"][0] == 1.0


def test_environment_alone_selects_offline_cache(tmp_path):
    """A fresh process configured only by HF_HUB_OFFLINE / HF_HUB_CACHE, as a deployment would be."""
    cache = tmp_path / "hub"
    add_to_cache(cache, "org/steer", make_iv(4.0))
    script = (
        "import json\n"
        "from steer_serve.formats import load_intervention, describe_intervention\n"
        "from steer_serve.formats.errors import InterventionFormatError\n"
        "iv = load_intervention('org/steer')\n"
        "try:\n"
        "    load_intervention('org/absent')\n"
        "    miss = None\n"
        "except InterventionFormatError as e:\n"
        "    miss = [str(e), str(e.__cause__)]\n"
        "print(json.dumps({'d': describe_intervention(iv), 'v': iv.edits[0].params['vector'].tolist(), 'miss': miss}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["v"] == [4.0] * 8 and result["d"]["families"] == ["steering_vector"]
    assert "not in the local cache" in result["miss"][0] and "HF_HUB_OFFLINE=0" in result["miss"][1]
