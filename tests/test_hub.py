"""The hub check (`diffcli.hub`): one probe, offline variables honoured, and the cache used at once when it is off."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcli import data_sources, hub, weights
from diffcli.cli.app import app
from diffcli.errors import HubUnavailableError
from diffcli.tasks import Example

REPO = Path(__file__).resolve().parents[1]
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture(autouse=True)
def fresh_probe():
    hub._probe.cache_clear()
    yield
    hub._probe.cache_clear()


@pytest.fixture
def online_env(monkeypatch):
    """A process set up for the network: no offline variable, the libraries' offline flags off, no GLUE_DIR.

    conftest switches the hub off for every other test, before datasets and huggingface_hub read the variable.
    """
    import datasets.config
    import huggingface_hub.constants

    for name in (*OFFLINE_VARS, "GLUE_DIR", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for module, name in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, name, False)


def probe_says(monkeypatch, failure):
    calls = []
    monkeypatch.setattr(hub, "_probe", lambda *a: calls.append(a) or failure)
    return calls


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """Both hub caches empty, in tmp_path."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def recording_load_dataset(monkeypatch, result):
    """Replace datasets.load_dataset; each call records whether datasets and huggingface_hub were in offline mode."""
    import datasets
    import huggingface_hub.constants

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


# --------------------------------------------------------------------------------------------- the probe

def test_probe_connects_to_a_listening_port_and_names_a_refused_one():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    assert hub._probe("127.0.0.1", port, 2.0) is None
    server.close()
    hub._probe.cache_clear()
    assert "refused" in hub._probe("127.0.0.1", port, 2.0).lower()


def test_probe_gives_up_when_the_connection_hangs(monkeypatch):
    """A name lookup or connect that never returns (no DNS answer, dropped packets) still ends the probe."""
    release = threading.Event()

    def hang(*_a, **_k):
        release.wait(60)
        raise OSError("released by the test")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        assert hub._probe("hub.invalid", 443, 0.05) == "no answer within 0.05 s"
    finally:
        release.set()


def test_probe_runs_once_per_process(monkeypatch, online_env):
    seen = []
    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout: seen.append(addr) or socket.socket())
    assert hub.unavailable() is None and hub.unavailable(datasets=True) is None
    assert seen == [("huggingface.co", 443)]


@pytest.mark.parametrize("env, target", [
    ({}, ("huggingface.co", 443, "huggingface.co:443")),
    ({"HF_ENDPOINT": "http://mirror.example:8080/"}, ("mirror.example", 8080, "mirror.example:8080")),
    ({"HF_ENDPOINT": "https://hf-mirror.example"}, ("hf-mirror.example", 443, "hf-mirror.example:443")),
    ({"HTTPS_PROXY": "http://proxy.example:3128"}, ("proxy.example", 3128, "the proxy proxy.example:3128")),
    ({"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "huggingface.co"},
     ("huggingface.co", 443, "huggingface.co:443")),
])
def test_probe_target_is_the_endpoint_or_its_proxy(monkeypatch, online_env, env, target):
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub.probe_target() == target


@pytest.mark.parametrize("env, expected", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 is set"),
    ({"TRANSFORMERS_OFFLINE": "yes"}, "TRANSFORMERS_OFFLINE=yes is set"),
    ({"HF_HUB_OFFLINE": "0"}, None),
])
def test_offline_variables_are_honoured_without_a_probe(monkeypatch, online_env, env, expected):
    calls = probe_says(monkeypatch, None)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub.unavailable() == expected
    assert bool(calls) == (expected is None)


def test_hf_datasets_offline_decides_for_datasets_only(monkeypatch, online_env):
    probe_says(monkeypatch, None)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.unavailable(datasets=True) == "HF_DATASETS_OFFLINE=1 is set"
    assert hub.unavailable() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # as in datasets.config: it overrides HF_HUB_OFFLINE
    assert hub.unavailable(datasets=True) is None
    assert hub.unavailable() == "HF_HUB_OFFLINE=1 is set"


def test_datasets_offline_restores_the_libraries_flags(online_env):
    import datasets.config
    import huggingface_hub.constants

    with pytest.raises(RuntimeError), hub.datasets_offline():
        assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.is_offline_mode()
        raise RuntimeError
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False


# --------------------------------------------------------------------------------------------- task data

def test_unreachable_hub_goes_to_the_example_set_without_trying_the_network(monkeypatch, online_env):
    probe_says(monkeypatch, "Name or service not known")
    calls = recording_load_dataset(monkeypatch, ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub "
                                                                "(OfflineModeIsEnabled)"))
    data = data_sources.load_task("rte", max_train_samples=4)
    assert [(args, offline) for args, offline, _ in calls] == [(("nyu-mll/glue", "rte"), True)]
    assert calls[0][2] is True  # huggingface_hub offline too: no request, no retry
    assert data.source["kind"] == "example" and len(data.train) == 4
    assert data.source["why"] == (
        "no --data-dir or GLUE_DIR, and cannot load GLUE task rte from the hub (nyu-mll/glue): Couldn't reach "
        "'nyu-mll/glue' on the Hub (OfflineModeIsEnabled); huggingface.co:443 is unreachable (Name or service not "
        "known), so only the local cache was looked at")


def test_reachable_hub_is_asked_online(monkeypatch, online_env):
    import datasets

    probe_says(monkeypatch, None)
    part = datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [1], "idx": [0]})
    calls = recording_load_dataset(monkeypatch, datasets.DatasetDict({"train": part, "validation": part}))
    data = data_sources.load_task("rte")
    assert calls == [(("nyu-mll/glue", "rte"), False, False)]
    assert data.source == {"kind": "hub", "path": "nyu-mll/glue/rte", "name": "the hub (nyu-mll/glue/rte)"}
    assert data.train == [Example(("a", "b"), 1)]


def test_hf_hub_offline_reads_the_cache_only_and_never_probes(monkeypatch, online_env):
    probe = probe_says(monkeypatch, None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = recording_load_dataset(monkeypatch, ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub"))
    data = data_sources.load_task("rte", need_train=False)
    assert probe == [] and [c[1:] for c in calls] == [(True, True)]
    assert data.source["kind"] == "example" and "HF_HUB_OFFLINE=1 is set" in data.source["why"]


def write_cached_glue(cache: Path, task: str, rows: dict[str, list[tuple[str, str, int]]]) -> None:
    """A datasets cache entry as `load_dataset("nyu-mll/glue", task)` leaves it (arrow files + dataset_info.json)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    folder = cache / "nyu-mll___glue" / task / "0.0.0" / "0123456789abcdef"
    folder.mkdir(parents=True)
    splits = datasets.SplitDict(dataset_name="glue")
    for split, items in rows.items():
        part = datasets.Dataset.from_dict({"sentence1": [r[0] for r in items], "sentence2": [r[1] for r in items],
                                           "label": [r[2] for r in items], "idx": list(range(len(items)))})
        with ArrowWriter(path=str(folder / f"glue-{split}.arrow")) as writer:
            writer.write_table(part.data.table)
            writer.finalize()
        splits.add(datasets.SplitInfo(name=split, num_examples=len(items), dataset_name="glue"))
    datasets.DatasetInfo(dataset_name="glue", config_name=task, features=part.features,
                         splits=splits).write_to_directory(str(folder))


def test_a_cached_copy_still_loads_when_the_hub_is_unreachable(monkeypatch, online_env, empty_caches):
    write_cached_glue(empty_caches / "datasets", "rte", {"train": [("p", "h", 0), ("q", "k", 1)],
                                                         "validation": [("v", "w", 1)]})
    probe_says(monkeypatch, "Name or service not known")
    data = data_sources.load_task("rte")
    assert data.train == [Example(("p", "h"), 0), Example(("q", "k"), 1)]
    assert data.eval == {"validation": [Example(("v", "w"), 1)]}
    assert data.source["kind"] == "hub"
    assert data.source["name"] == ("the local hub cache (nyu-mll/glue/rte; huggingface.co:443 is unreachable "
                                   "(Name or service not known))")


def test_train_with_an_unreachable_hub_warns_as_before(monkeypatch, online_env, empty_caches, tmp_path, tiny_base):
    """The real datasets in offline mode with an empty cache: the same fallback and warning as a failed download."""
    probe_says(monkeypatch, "Name or service not known")
    fast = ["--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8", "--sparsity", "2%",
            "--max-train-samples", "8", "--max-eval-samples", "8"]
    result = CliRunner().invoke(app, ["train", "--task", "rte", "--model", str(tiny_base), *fast,
                                      "-o", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    warning = [ln for ln in result.stderr.splitlines() if ln.startswith("warning: training on the example set")]
    assert len(warning) == 1, result.stderr
    assert "cannot load GLUE task rte from the hub (nyu-mll/glue): Couldn't reach" in warning[0]
    assert "huggingface.co:443 is unreachable (Name or service not known)" in warning[0]


def test_a_fresh_process_without_network_falls_back(tmp_path):
    """No offline variable, an endpoint that refuses connections, an empty cache: the example set, no hub retries."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.close()
    env = {k: v for k, v in os.environ.items() if k not in (*OFFLINE_VARS, "GLUE_DIR")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    code = ("from diffcli.data_sources import load_task; d = load_task('rte', need_train=False); "
            "print(d.source['kind']); print(d.source['why'])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    kind, why = proc.stdout.strip().splitlines()
    assert kind == "example" and f"127.0.0.1:{port} is unreachable" in why


# --------------------------------------------------------------------------------------------- models

def write_cached_model(cache: Path, repo_id: str, folder: Path) -> Path:
    """A huggingface_hub cache entry for repo_id at main, as snapshot_download leaves it."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = repo / "snapshots" / sha
    shutil.copytree(folder, snapshot)
    return snapshot


def test_a_cached_model_resolves_when_the_hub_is_unreachable(monkeypatch, online_env, empty_caches, tiny_base):
    snapshot = write_cached_model(empty_caches / "hub", "some-org/tiny", tiny_base)
    probe_says(monkeypatch, "Name or service not known")
    assert weights.resolve_model("some-org/tiny") == snapshot
    with pytest.raises(HubUnavailableError, match="huggingface.co:443 is unreachable .* no complete copy is in "
                                                  "the local cache"):
        weights.resolve_model("some-org/not-cached")


@pytest.mark.parametrize("failure, env, local_only", [
    (None, {}, False),
    ("Name or service not known", {}, True),
    (None, {"HF_HUB_OFFLINE": "1"}, True),
])
def test_model_download_asks_the_network_only_when_the_hub_answers(monkeypatch, online_env, tiny_base,
                                                                   failure, env, local_only):
    import huggingface_hub

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    probe_says(monkeypatch, failure)
    seen = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: seen.append((repo_id, kw["local_files_only"])) or str(tiny_base))
    assert weights.resolve_model("some-org/tiny") == tiny_base
    assert seen == [("some-org/tiny", local_only)]
