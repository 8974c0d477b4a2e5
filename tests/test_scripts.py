"""scripts/: inspect_adapter (table + PNGs per adapter type), merge (plain transformers model, per task for
conditioned adapters) and push_to_hub (dry run reloaded in a fresh process; upload against a local stand-in Hub)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib", reason="needs the recipes extra (matplotlib)")
pytest.importorskip("huggingface_hub", reason="needs the recipes extra (huggingface_hub)")
import transformers as tf  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

import hadapeft  # noqa: E402
from recipes.loading import dummy_inputs  # noqa: E402
from recipes.modelcard import render_model_card  # noqa: E402
from scripts import inspect_adapter, merge, push_to_hub  # noqa: E402
from test_recipes import make_assets, restored_globals, run_recipe, smoke_values  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_TESTtoken_never_printed_0123456789"

ADAPTERS = {
    "gated_lora": lambda: hadapeft.GatedLoraConfig(r=4, target_modules="all-linear", init_weights=False),
    "hada_ia3": lambda: hadapeft.HadaIA3Config(init_weights=False),
}
if hasattr(hadapeft, "FiLMConfig"):
    ADAPTERS["film"] = lambda: hadapeft.FiLMConfig(num_tasks=3, init_weights=False)
if hasattr(hadapeft, "HyperModConfig"):
    ADAPTERS["hypermod"] = lambda: hadapeft.HyperModConfig(num_tasks=3, init_weights=False)
CONDITIONED = {"film", "hypermod"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    """Non-trivial (init_weights=False) adapters of every type, saved by peft (no recipe record)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, make in ADAPTERS.items():
        torch.manual_seed(1)
        model = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base_dir), make())
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def adapted(adapter_dir: Path, base_dir: Path):
    return PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()


def logits_for(model, inputs, task: int | None):
    with torch.no_grad():
        if task is None:
            return model(**inputs).logits
        with hadapeft.conditioning(model, task_ids=torch.full((inputs["input_ids"].shape[0],), task)):
            return model(**inputs).logits


# ------------------------------------------------------------------------------------------------------ inspect
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_inspect_writes_a_table_and_real_pngs(kind, adapters, tmp_path, capsys):
    import matplotlib.image

    res = inspect_adapter.main([str(adapters[kind]), "--out-dir", str(tmp_path)])
    table = capsys.readouterr().out
    assert f"{kind}:" in table and "model.layers.1." in table
    n_tasks = 3 if kind in CONDITIONED else 1
    n_layers = len({r["module"] for r in res["layers"]})
    assert n_layers >= 2 and len(res["layers"]) == n_layers * n_tasks
    if kind == "gated_lora":  # γ per output feature, inside [0, 1], not all 1 (init_weights=False)
        assert all(r["side"] == "out" and 0 <= r["min"] <= r["max"] <= 1 and r["open_frac"] > 0 for r in res["layers"])
    if kind == "film":  # tasks differ
        by_task = [[r["mean"] for r in res["layers"] if r["task"] == t] for t in range(3)]
        assert by_task[0] != by_task[1]
    assert sorted(Path(p).name for p in res["plots"]) == ["gate_histograms.png", "mean_per_layer.png",
                                                          "open_features.png"]
    for p in res["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and min(img.shape[:2]) > 200 and img[..., :3].std() > 0.05, (p, img.shape)
    assert json.loads((tmp_path / "stats.json").read_text())["peft_type"] == kind.upper()


# -------------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_merge_saves_a_plain_model_that_computes_the_adapter(kind, adapters, base_dir, tmp_path):
    task = 2 if kind in CONDITIONED else None
    args = [str(adapters[kind]), "--output-dir", str(tmp_path / "merged")] + (["--task-id", "2"] if task else [])
    res = merge.main(args)
    assert res["max_abs_diff"] < 1e-4  # the saved folder, reloaded by transformers, against the adapted model
    # FiLM's and HyperMod's shifts need biases that Llama's layers lack: declared through its config flags.
    assert bool(res["declared"]) == (kind in CONDITIONED)
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # transformers only
    assert not any("lora" in k or "hada" in k or "film" in k or "hypermod" in k for k in merged.state_dict())
    inputs = dummy_inputs(merged, batch=3, seq=7, seed=5)
    expected = logits_for(adapted(adapters[kind], base_dir), inputs, task)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    if task is not None:
        other = logits_for(adapted(adapters[kind], base_dir), inputs, 0)
        assert (other - expected).abs().max() > 1e-3  # it merged task 2, not another one
        with pytest.raises(SystemExit, match="task-conditioned.*--task-id"):
            merge.main([str(adapters[kind]), "--output-dir", str(tmp_path / "no")])
        assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------------------------------- push
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder written by the SFT recipe: adapter, tokenizer, model card, plus checkpoints, logs and base_model."""
    root = tmp_path_factory.mktemp("trained")
    assets = make_assets(root / "assets")
    values = {**smoke_values(assets, "sft", str(root / "run"), {"type": "gated_lora", "r": 4}, steps=4),
              "save_steps": 2}
    with restored_globals():
        run_recipe("sft", values)
    return root / "run"


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


UPLOADED = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
            "hadapeft_training.json", "tokenizer.json", "tokenizer_config.json"}


def _uploaded(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_push_dry_run_is_what_a_stranger_installs_and_loads(trained, tmp_path, capsys):
    """The staged folder holds the adapter, hadapeft's wheel and the recipe-built base; in a fresh interpreter that
    sees neither this checkout nor its packages, the card's install line (the wheel, installed for real) and load
    lines (the base by its path in the folder) give the trained model's logits."""
    out = tmp_path / "upload"
    res = push_to_hub.main([str(trained), "--repo-id", "someone/tiny-sft", "--dry-run", str(out)])
    printed = capsys.readouterr().out
    assert "loads onto" in printed and "uploaded with the adapter" in printed
    left_out = next(line for line in printed.splitlines() if line.startswith("not uploaded: "))
    assert {"checkpoint-2/", "config.yaml", "log.jsonl"} <= set(left_out[len("not uploaded: "):].split(", "))
    assert "base_model" not in left_out, left_out
    wheels = [f for f in res["files"] if f.endswith(".whl")]
    assert len(wheels) == 1 and wheels[0].startswith(f"hadapeft-{hadapeft.__version__}-")
    base_files = {f for f in res["files"] if f.startswith("base_model/")}
    assert "base_model/config.json" in base_files and any(f.endswith(".safetensors") for f in base_files)
    assert set(res["files"]) == UPLOADED | {wheels[0]} | base_files == _uploaded(out)
    assert (out / "adapter_model.safetensors").read_bytes() == (trained / "adapter_model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "base_model" not in meta  # no Hub id for a random base
    assert {"hadapeft", "gated_lora", "peft"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    assert f"pip install https://huggingface.co/someone/tiny-sft/resolve/main/{wheels[0]}" in card
    assert "snapshot_download('someone/tiny-sft')" in card and 'f"{folder}/base_model"' in card
    # With --base-model-id the card names the base by its Hub id, in the metadata and the load line.
    named = render_model_card(out, "someone/tiny-sft", "someone/tiny-llama", wheels[0])
    assert _front_matter(named)["base_model"] == "someone/tiny-llama"
    assert "AutoModelForCausalLM.from_pretrained('someone/tiny-llama')" in named

    # The install line, for real (offline: the wheel file the URL serves), into a folder of its own.
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                          str(out / wheels[0])], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    model = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(trained / "base_model"),
                                      str(trained)).eval()
    inputs = dummy_inputs(model)
    torch.save(inputs, tmp_path / "inputs.pt")
    code = (f"import torch, hadapeft, transformers as tf\nfrom peft import PeftModel\n"
            f"assert hadapeft.__file__.startswith({str(site)!r}), hadapeft.__file__\n"
            f"folder = {str(out)!r}\n"
            f"m = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(f'{{folder}}/base_model'), "
            f"folder).eval()\n"
            f"with torch.no_grad(): torch.save(m(**torch.load('inputs.pt')).logits, 'logits.pt')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(**inputs).logits, rtol=0, atol=0)


class FakeHub:
    """A stand-in for the Hub on 127.0.0.1 with the endpoints create_repo + upload_folder use: POST
    /api/repos/create, /api/validate-yaml, /api/models/{repo}/preupload/{rev} (answers "regular" for every file, so
    contents travel base64 in the commit rather than through LFS) and /api/models/{repo}/commit/{rev} (NDJSON).
    Anything else gets 404. It serves at most ``max_requests`` requests, then stops by itself."""

    def __init__(self, max_requests: int = 40):
        self.requests, self.files, self.repos, self.left = [], {}, {}, max_requests
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer()

            do_POST = do_PUT = do_HEAD = do_GET

            def answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                hub.requests.append({"method": self.command, "path": self.path, "body": body,
                                     "authorization": self.headers.get("authorization")})
                hub.left -= 1
                status, payload = hub.route(self.command, self.path.split("?")[0], body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                if hub.left <= 0:
                    threading.Thread(target=hub.server.shutdown, daemon=True).start()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def route(self, method, path, body):
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}"
            self.repos[repo] = req
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {}
        if method == "POST" and re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/[^/]+", path):
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]}
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/[^/]+", path)
        if method == "POST" and m:
            for line in body.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    self.files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            return 200, {"commitUrl": f"{self.url}/{m.group(1)}/commit/{'0' * 40}", "commitOid": "0" * 40}
        return 404, {"error": f"{method} {path} is not implemented by the test hub"}

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_push_uploads_the_staged_folder_and_never_prints_the_token(trained, tmp_path):
    dry = tmp_path / "dry"
    push_to_hub.main([str(trained), "--repo-id", "someone/tiny-sft", "--dry-run", str(dry), "--no-check"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_TOKEN": TOKEN,
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    with FakeHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        proc = subprocess.run([sys.executable, "-m", "scripts.push_to_hub", str(trained), "--repo-id",
                               "someone/tiny-sft", "--private"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert TOKEN not in output and TOKEN[3:12] not in output
    assert hub.repos["someone/tiny-sft"]["visibility"] == "private"
    # Exactly the dry run's folder arrived (the adapter's files, hadapeft's wheel, base_model/), byte for byte; the
    # wheel is built again, from the same sources.
    assert set(hub.files) == _uploaded(dry) and UPLOADED < set(hub.files)
    for name, data in hub.files.items():
        assert name.endswith(".whl") or data == (dry / name).read_bytes(), name
    writes = [r for r in hub.requests if r["method"] == "POST"]
    assert [r["path"].split("/")[-2] if "/models/" in r["path"] else r["path"] for r in writes] == \
        ["/api/repos/create", "/api/validate-yaml", "preupload", "commit"]
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in writes)
    assert "commit/" + "0" * 40 in proc.stdout


def test_push_without_login_fails_before_uploading(trained, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(SystemExit, match="not logged in.*hf auth login.*HF_TOKEN"):
        push_to_hub.main([str(trained), "--repo-id", "someone/tiny-sft", "--no-check"])
    with pytest.raises(SystemExit, match="user/name"):
        push_to_hub.main([str(trained), "--repo-id", "tiny-sft", "--no-check"])
