"""`ember train` on two processes (torchrun, gloo, CPU) against one process with the same global batch, and
an FSDP2 run killed mid-checkpoint that resumes exactly.

Each torchrun launch costs seconds of start-up (two interpreters importing torch and transformers), so one
launch runs every short training: this file is also the worker torchrun starts (``--worker SPEC.json``).
The last run of that launch kills rank 1 as a checkpoint begins (torchrun then ends rank 0); a second
launch resumes it. The single-process references run in the test process. (torchrun's own
``--max-restarts`` would save the second start-up, but its restarted gloo group fails to connect here.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ember.engine.checkpoint as checkpoint_module
import ember.engine.train as train_module
from ember.engine import distributed
from ember.engine.config import ConfigError, TrainConfig
from ember.engine.train import evaluate_checkpoint
from ember.kernels.backend import forced_backend

# Every (model, mode) pair runs 6 steps; the 2-process runs use batch_size 4 per process, the single-process
# references batch_size 8: the same global batches (two of them accumulated per step in two cases, where the
# gradients are reduced on the last micro-batch only).
STEPS = 6
CASES = {  # name: overrides of the common config
    "ddp-lora": dict(lora_r=4, optimizer="adamw8bit", distributed="ddp", gradient_checkpointing=True, grad_accum=2),
    "ddp-qlora": dict(lora_r=4, qlora=True, optimizer="adamw", distributed="ddp"),
    "fsdp-full-adamw8bit": dict(lora_r=0, optimizer="adamw8bit", distributed="fsdp", lr=3e-3),
    "fsdp-full-adamw": dict(lora_r=0, optimizer="adamw", distributed="fsdp", lr=3e-3, grad_accum=2),
}


def _config(model: str, data: str, out_dir: str, case: str, **overrides) -> TrainConfig:
    common = dict(data=data, out_dir=out_dir, max_steps=STEPS, warmup_steps=2, lr=1e-2, eval_every=100,
                  save_every=3, eval_size=12, lora_alpha=8.0, lora_dropout=0.0, progress=False, precision="fp32",
                  grad_clip=1.0, seed=0)
    if "llama" in Path(model).name:
        common.update(task="causal-lm", max_length=32, pack=True)
    else:
        common.update(task="sequence-classification", max_length=16)
    return TrainConfig(model=model, **{**common, **CASES[case], **overrides})


# ----------------------------------------------------------------------------
# The worker (run by torchrun)
# ----------------------------------------------------------------------------


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    kill = spec.get("kill")  # {"run": name, "rank": r, "step": s}: that rank of that run dies as the
    # checkpoint of step s begins
    if kill:
        original = checkpoint_module._write_shards

        def write_shards(tensors, temporary):
            if (distributed.current().rank == kill["rank"] and kill["run"] in str(temporary)
                    and f"step-{kill['step']:08d}" in str(temporary)):
                os.kill(os.getpid(), signal.SIGKILL)  # before writing its shards: the checkpoint is unfinished
            return original(tensors, temporary)

        checkpoint_module._write_shards = write_shards
    for run in spec["runs"]:
        done = Path(spec["results"]) / f"{run['name']}.json"
        if done.is_file():  # finished before a restart
            continue
        config = _config(run["model"], spec["data"][run["model"]], run["out_dir"], run["case"],
                         **run.get("overrides", {}))
        checkpoints = sorted(p.name for p in (Path(run["out_dir"]) / "checkpoints").glob("*"))
        with forced_backend("torch"):  # the kernels' own tests prove them; here the processes are under test
            result = train_module.train(config)
        if distributed.current().main:
            done.write_text(json.dumps({"losses": result.losses, "eval_after": result.eval_after,
                                        "steps": result.steps, "checkpoints_found": checkpoints}))
    distributed.shutdown()


def _launch(tmp_path: Path, spec: dict, name: str, fails: bool = False) -> str:
    """Run the worker on two processes (results go to tmp_path/results); the launch's stdout."""
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps({**spec, "results": str(results)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               __file__, "--worker", str(spec_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert (done.returncode != 0) == fails, done.stderr[-4000:]
    return done.stdout


# ----------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_bert, tmp_path_factory):
    """A BERT and a Llama from random configs, large enough that AdamW8bit keeps 8-bit state for most of their
    matrices (4096 elements and more), with the word-level tokenizer of tiny_bert."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    folders = {}
    for name, build in {
        "bert": lambda: transformers.BertModel(transformers.BertConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=40, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
    }.items():
        folder = tmp_path_factory.mktemp(f"dist-{name}")
        tokenizer.save_pretrained(folder)
        torch.manual_seed(0)
        build().save_pretrained(folder)
        folders[name] = str(folder)
    return folders


@pytest.fixture(scope="module")
def data(models, sentiment_csv, story_txt):
    return {models["bert"]: str(sentiment_csv), models["llama"]: str(story_txt)}


def _one_process(model, data, out_dir, case, **overrides):
    with forced_backend("torch"):
        return train_module.train(_config(model, data[model], str(out_dir), case, batch_size=8, **overrides))


def _close(two: list[float], one: list[float], case: str) -> None:
    """The same global batches on one and on two processes: fp32 sums in another order (the gradient all-reduce,
    the loss over ranks); AdamW8bit's codes may round the other way where a moment lies on a code boundary."""
    assert len(two) == len(one) == STEPS
    assert two == pytest.approx(one, rel=1e-5), case  # seen: 1e-7


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


KILLED = "llama-fsdp-killed"
BF16 = "llama-fsdp-full-adamw-bf16"


@pytest.fixture(scope="module")
def two_process_runs(models, data, tmp_path_factory):
    """One torchrun launch of two processes: every (model, case) pair, 6 steps each, then the killed run."""
    tmp_path = tmp_path_factory.mktemp("two")
    runs = [{"name": f"{family}-{case}", "model": models[family], "case": case,
             "out_dir": str(tmp_path / f"{family}-{case}"), "overrides": {"batch_size": 4}}
            for family in ("llama", "bert") for case in CASES]
    runs.append({"name": BF16, "model": models["llama"], "case": "fsdp-full-adamw", "out_dir": str(tmp_path / BF16),
                 "overrides": {"batch_size": 4, "precision": "bf16"}})
    killed = {"name": KILLED, "model": models["llama"], "case": "fsdp-full-adamw8bit",
              "out_dir": str(tmp_path / KILLED), "overrides": {"batch_size": 4, "resume": True}}
    stdout = _launch(tmp_path, {"runs": [*runs, killed], "data": data,
                                "kill": {"run": KILLED, "rank": 0, "step": 6}}, "first", fails=True)
    stdout += _launch(tmp_path, {"runs": [killed], "data": data}, "resumed")
    results = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "results").iterdir()}
    return results, stdout, tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_two_processes_match_one(two_process_runs, models, data, tmp_path, family):
    """DDP + LoRA, DDP + QLoRA, FSDP2 + full fine-tune with AdamW8bit and with torch AdamW: 6 steps on two
    processes of batch 4 give the losses of one process with batch 8."""
    results, stdout, folder = two_process_runs
    for case in CASES:
        one = _one_process(models[family], data, tmp_path / case, case)
        two = results[f"{family}-{case}"]
        _close(two["losses"], one.losses, case)
        for metric, value in one.eval_after.items():  # the sharded evaluation reduces to the same metrics
            assert two["eval_after"][metric] == pytest.approx(value, rel=1e-4), (case, metric)
        out = folder / f"{family}-{case}"
        saved = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert saved == ["step-00000003", "step-00000006"], (case, saved)
        sharded = (out / "checkpoints" / "step-00000006" / "shards" / ".metadata").is_file()
        assert sharded == case.startswith("fsdp"), case
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [record["kind"] for record in log].count("config") == 1  # rank 0 alone wrote it
        final = out / "final"
        assert (final / ("model" if case.startswith("fsdp") else "adapter")).is_dir(), case
        if case.startswith("fsdp"):  # the export holds the whole weights, gathered from the shards
            from safetensors.torch import load_file

            two_weights = load_file(final / "model" / "model.safetensors")
            one_weights = load_file(one.out_dir / "final" / "model" / "model.safetensors")
            assert {k: v.shape for k, v in two_weights.items()} == {k: v.shape for k, v in one_weights.items()}
            for name, weight in one_weights.items():
                torch.testing.assert_close(two_weights[name], weight, rtol=0, atol=1e-3, msg=name)
    # One process reads the two processes' shards whole (DCP reshards 2 -> 1): the same held-out metrics.
    case = "fsdp-full-adamw"
    config = _config(models[family], data[models[family]], str(folder / f"{family}-{case}"), case)
    with forced_backend("torch"):
        metrics, _ = evaluate_checkpoint(config)
    assert metrics == pytest.approx(results[f"{family}-{case}"]["eval_after"], rel=1e-4)
    assert stdout.count("held-out before") == len(CASES) * 2 + 3  # rank 0 alone printed (+ bf16, killed twice)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision(two_process_runs, models, data, tmp_path):
    """FSDP2 with MixedPrecisionPolicy (bf16 parameters for compute, fp32 gradient reduction) against one process
    with bf16 autocast, both against the fp32 run, by the tolerance rule: FSDP2's error at most twice the
    single process's, plus a small atol (FSDP2 also casts the embeddings and norms to bf16, autocast does not)."""
    results, _, _ = two_process_runs
    fp32 = torch.tensor(results["llama-fsdp-full-adamw"]["losses"], dtype=torch.float64)
    one = torch.tensor(_one_process(models["llama"], data, tmp_path, "fsdp-full-adamw", precision="bf16").losses,
                       dtype=torch.float64)
    two = torch.tensor(results[BF16]["losses"], dtype=torch.float64)
    assert not torch.equal(two, fp32)  # bf16 did run
    assert ((two - fp32).abs() <= 2 * (one - fp32).abs() + 2e-2).all(), (two - fp32, one - fp32)


@pytest.mark.slow
def test_ddp_checkpoint_resumes_on_one_process_with_the_same_global_batch(two_process_runs, models, data, tmp_path):
    """A checkpoint of two DDP processes of batch 4 (written by rank 0 as one process writes) resumes on one
    process of batch 8: refused unless asked for, as a changed batch_size is; then the same global batches,
    so the losses of the uninterrupted two-process run."""
    import shutil

    results, _, folder = two_process_runs
    case = "ddp-lora"
    out = tmp_path / case
    shutil.copytree(folder / f"llama-{case}", out)
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    shutil.rmtree(out / "final")
    with pytest.raises(ConfigError, match="resume_allow_changes=true"):
        _one_process(models["llama"], data, out, case, resume=True)
    with pytest.warns(UserWarning, match="global batch changes"):
        resumed = _one_process(models["llama"], data, out, case, resume=True, resume_allow_changes=True)
    assert resumed.losses == pytest.approx(results[f"llama-{case}"]["losses"][3:], rel=1e-5)


@pytest.mark.slow
def test_fsdp_run_killed_mid_checkpoint_resumes_exactly(two_process_runs):
    """Rank 0, the one that renames a checkpoint into place, is SIGKILLed as the checkpoint of step 6 begins
    (its temporary made, its shards not written; the one of step 3 is whole): rank 1's save fails, torchrun
    ends the job, and the unfinished temporary is never used. Relaunched with --resume=true, the run resumes
    from step 3 to the losses of an uninterrupted run."""
    results, stdout, folder = two_process_runs
    whole = results["llama-fsdp-full-adamw8bit"]["losses"]
    resumed = results[KILLED]
    # What the restarted ranks found: the whole checkpoint of step 3 and the unfinished one of step 6.
    found = resumed["checkpoints_found"]
    assert [name for name in found if not name.startswith(".")] == ["step-00000003"], found
    assert any(name.startswith(".step-00000006.tmp-") for name in found), found
    checkpoints = folder / KILLED / "checkpoints"
    assert f"resumed from {checkpoints / 'step-00000003'} at step 3" in stdout
    assert resumed["losses"] == whole[3:]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003", "step-00000006"]  # temporary gone


def test_rendezvous_variables_are_named(monkeypatch):
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT are not set"):
        distributed.from_environment({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="WORLD_SIZE is set but RANK is not"):
        distributed.from_environment({"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="RANK is set but WORLD_SIZE is not"):
        distributed.from_environment({"RANK": "1"})
    with pytest.raises(ConfigError, match="RANK: expected an integer"):
        distributed.from_environment({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"})
    assert distributed.from_environment({}) == distributed.Processes()
    assert distributed.from_environment({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                                         "MASTER_PORT": "1"}) == distributed.Processes(1, 1, 2)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(lora_r=4, qlora=True), "qlora with distributed = 'fsdp' is not supported"),
    (dict(lora_r=4), "distributed = 'fsdp' trains full fine-tunes"),
    (dict(lora_r=0, optimizer="bnb_adamw8bit"), "'bnb_adamw8bit' with distributed = 'fsdp' is not supported"),
    (dict(lora_r=0, precision="fp16"), "precision fp16 with distributed = 'fsdp'"),
])
def test_fsdp_refuses_what_it_does_not_run(overrides, message):
    from ember.engine.config import check

    with pytest.raises(ConfigError, match=message):
        check(TrainConfig(distributed="fsdp", **overrides))


def test_auto_chooses_fsdp_for_full_fine_tunes():
    assert distributed.resolve_mode("auto", lora_r=0) == "fsdp"
    assert distributed.resolve_mode("auto", lora_r=16) == "ddp"
    assert distributed.resolve_mode("ddp", lora_r=0) == "ddp"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
