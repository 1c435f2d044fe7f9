"""Merging adapters into standalone checkpoints, and the Hub push with its model card (HfApi intercepted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, train_steps
from huggingface_hub import CommitInfo, HfApi
from transformers import AutoModelForCausalLM

import hf_longlora
from hf_longlora import cli, extend_context, get_longlora_model, load_adapter, merge_and_save


def _base_and_adapter(tmp_path, arch="llama", tie=False):
    torch.manual_seed(0)
    config = tiny_config(arch, max_position_embeddings=64, tie_word_embeddings=tie)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="s2_attention")
    extend_context(model, 256)
    peft_model = get_longlora_model(model)
    peft_model.peft_config["default"].training_data = ["offline-corpus"]
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 200))
    train_steps(peft_model, ids, 3)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", ids


PLAIN_LOAD = """
import sys, json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
torch.save(logits, sys.argv[3])
assert "hf_longlora" not in sys.modules
print(json.dumps(model.config.rope_parameters), model.config.max_position_embeddings)
"""


@pytest.mark.parametrize("arch,tie", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_merged_model_loads_with_plain_transformers_and_matches(tmp_path, arch, tie):
    base, adapter, ids = _base_and_adapter(tmp_path, arch, tie)
    adapter_model = load_adapter(str(base), str(adapter))
    with torch.no_grad():
        want = adapter_model(ids).logits
    out = merge_and_save(str(base), str(adapter), str(tmp_path / "merged"))
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4.0
    assert config["max_position_embeddings"] == 256

    result = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(out), json.dumps(ids.tolist()), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"factor": 4.0' in result.stdout
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert (got - want).abs().max().item() <= 1e-5


def test_merge_refuses_to_overwrite(tmp_path):
    base, adapter, _ = _base_and_adapter(tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        merge_and_save(str(base), str(adapter), str(out))
    assert (out / "keep.txt").read_text() == "precious"
    code = cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    assert code == 2 and (out / "keep.txt").exists()
    assert (
        cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite"])
        == 0
    )
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_merge_refuses_an_out_dir_that_is_or_holds_an_input(tmp_path, capsys):
    """--out equal to, inside or containing --base or --adapter is refused even with --overwrite (it used to delete
    the adapter or replace the base's weights), before anything is loaded."""
    base, adapter, _ = _base_and_adapter(tmp_path)
    before = {p: p.read_bytes() for p in [*base.rglob("*"), *adapter.rglob("*")] if p.is_file()}
    for out, relation, what in (
        (adapter, "is", "adapter"),
        (base, "is", "base"),
        (adapter / "merged", "is inside", "adapter"),
        (tmp_path, "contains", "base"),
    ):
        code = cli.main(
            ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite"]
        )
        err = capsys.readouterr().err
        assert code == 2 and f"{relation} the {what}" in err and "choose another output folder" in err, err
    assert {p: p.read_bytes() for p in before} == before and not (adapter / "merged").exists()


def test_merge_from_a_bad_adapter_keeps_out_dir(tmp_path):
    base, adapter, _ = _base_and_adapter(tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        merge_and_save(str(base), str(adapter), str(out), overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.slow
def test_merge_cli_in_a_subprocess(tmp_path):
    base, adapter, _ = _base_and_adapter(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "hf_longlora.cli", "merge", "--base", str(base), "--adapter", str(adapter),
         "--out", str(tmp_path / "m"), "--dtype", "bf16"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------- hub


class RecordingHub:
    """Stands in for the Hub at HfApi's method boundary: records calls and the uploaded folder's contents."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.files = {}
        hub = self

        self.kwargs = {}  # method -> the keywords of its last call

        def create_repo(api, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
            hub.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
            hub.kwargs["create_repo"] = kwargs
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, *, branch, exist_ok=False, repo_type=None, **kwargs):
            hub.calls.append(("create_branch", repo_id, branch, exist_ok))
            hub.kwargs["create_branch"] = kwargs

        def create_commit(api, repo_id, operations, *, commit_message, repo_type=None, **kwargs):
            for op in operations:
                content = op.path_or_fileobj
                hub.files[op.path_in_repo] = (
                    content if isinstance(content, bytes) else Path(content).read_bytes()
                )
            hub.calls.append(("create_commit", repo_id, repo_type, commit_message))
            hub.kwargs["create_commit"] = kwargs
            if kwargs.get("create_pr"):
                return CommitInfo(
                    commit_url=f"https://huggingface.co/{repo_id}/commit/0123",
                    commit_message=commit_message,
                    commit_description="",
                    oid="0123",
                    pr_url=f"https://huggingface.co/{repo_id}/discussions/7",
                )
            return f"https://huggingface.co/{repo_id}/commit/0123"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)


def test_push_adapter_with_card(tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level("DEBUG")
    _, adapter, _ = _base_and_adapter(tmp_path)
    (adapter / "eval_summary.json").write_text(
        json.dumps({"perplexity": {"before": {"64": 30.5, "256": 80.1}, "after": {"64": 31.0, "256": 40.2}},
                    "passkey": {"before": 0.1, "after": 0.9}})
    )  # fmt: skip
    peft_readme = (adapter / "README.md").read_text()  # PEFT writes its own card on save
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    hub = RecordingHub(monkeypatch)
    (adapter / "checkpoint-2").mkdir()
    (adapter / "checkpoint-2" / "optimizer.pt").write_bytes(b"not uploaded")
    code = cli.main(["push", "--adapter", str(adapter), "--repo-id", "me/tiny-longlora", "--private"])
    assert code == 0
    assert hub.calls[0] == ("create_repo", "me/tiny-longlora", True, True, "model")
    assert hub.calls[1][:3] == ("create_commit", "me/tiny-longlora", "model")
    assert sorted(hub.files) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "eval_summary.json",
    ]
    assert hub.files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    card = hf_longlora.build_model_card(adapter, repo_id="me/tiny-longlora")
    readme = hub.files["README.md"].decode()
    assert readme == str(card)
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft"
    assert (
        "base_model" not in meta
    )  # a local path is not a Hub id: left out of the metadata, named in the body
    assert f"base model: {tmp_path / 'base'} (a local path" in readme
    assert "load_adapter(" in readme and "'me/tiny-longlora')" in readme
    assert meta["tags"] == ["longlora", "s2-attn", "lora", "peft", "text-generation"]
    assert "target context length: 256 tokens" in readme and "original context length: 64" in readme
    assert '"rope_type": "linear"' in readme and '"group_size_ratio": 0.25' in readme
    assert "embed_tokens" in readme and "offline-corpus" in readme
    assert "| 256 | 80.10 | 40.20 |" in readme and "| after | 90.00% |" in readme
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + readme + caplog.text
    assert (adapter / "README.md").read_text() == peft_readme  # the adapter folder is not modified


def test_push_merged_and_bad_input(tmp_path, monkeypatch):
    base, adapter, _ = _base_and_adapter(tmp_path)
    merged = merge_and_save(str(base), str(adapter), str(tmp_path / "merged"))
    hub = RecordingHub(monkeypatch)
    hf_longlora.push_to_hub(merged, "me/merged", merged=True, base_model="me/base")
    assert "model.safetensors" in hub.files and "README.md" in hub.files
    card = hub.files["README.md"].decode()
    assert "library_name: transformers" in card and "base_model: me/base" in card
    assert "longlora_adapter_config.json" in hub.files
    assert "target context length: 256 tokens" in card and "embed_tokens" in card and "offline-corpus" in card
    with pytest.raises(ValueError, match="repo_id must look like 'ORG/NAME'"):
        hf_longlora.push_to_hub(adapter, "no-slash")
    with pytest.raises(ValueError, match=r"merged=True \(--merged\).*has no config.json"):
        hf_longlora.push_to_hub(adapter, "me/x", merged=True)
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        hf_longlora.push_to_hub(merged, "me/x")
    assert len(hub.calls) == 2  # nothing was uploaded for the bad calls


def test_push_takes_huggingface_hub_keywords(tmp_path, monkeypatch, capsys):
    """token, revision, create_pr, commit_message and private reach huggingface_hub as its users pass them."""
    _, adapter, _ = _base_and_adapter(tmp_path)
    hub = RecordingHub(monkeypatch)
    url = hf_longlora.push_to_hub(
        adapter, "me/a", token="hf_tok", revision="v2", commit_message="LongLoRA 32k", commit_description="d"
    )
    assert url == "https://huggingface.co/me/a/commit/0123"
    assert hub.calls[0] == ("create_repo", "me/a", None, True, "model")  # private: the account's default
    assert hub.calls[1] == ("create_branch", "me/a", "v2", True)  # the branch is created if missing
    assert hub.calls[2] == ("create_commit", "me/a", "model", "LongLoRA 32k")
    assert (
        hub.kwargs["create_commit"]["revision"] == "v2" and hub.kwargs["create_commit"]["token"] == "hf_tok"
    )
    assert (
        hub.kwargs["create_commit"]["commit_description"] == "d"
        and not hub.kwargs["create_commit"]["create_pr"]
    )
    assert hub.kwargs["create_repo"]["token"] == "hf_tok" and hub.kwargs["create_branch"]["token"] == "hf_tok"
    # a pull request: no branch is created, the PR's URL comes back
    hub = RecordingHub(monkeypatch)
    code = cli.main(
        ["push", "--adapter", str(adapter), "--repo-id", "me/a", "--create-pr", "--commit-message", "m",
         "--token", "hf_x", "--revision", "main"]
    )  # fmt: skip
    assert code == 0 and "https://huggingface.co/me/a/discussions/7" in capsys.readouterr().out
    assert [c[0] for c in hub.calls] == ["create_repo", "create_commit"] and hub.calls[1][3] == "m"
    assert (
        hub.kwargs["create_commit"]["create_pr"] is True and hub.kwargs["create_commit"]["revision"] == "main"
    )
