"""Task evals (jaxlm/tasks.py): the packed scorer against plain forward passes, accuracy, bad task
files, the trainer's logging, ``jaxlm eval --task``, the shipped task and the lm-eval adapter."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tolerances import assert_close, loss_terms

from jaxlm import lm, model, report, sharding, tasks, train
from jaxlm.cli import main as cli
from jaxlm.config import MeshConfig, apply_overrides, load_config, preset
from jaxlm.data.prepare import DataError
from jaxlm.data.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_MC = ROOT / "tests" / "fixtures" / "tasks" / "tiny_mc.jsonl"
BYTES = get_tokenizer("bytes")


_forward = jax.jit(model.forward, static_argnames="cfg")


def _hand_logp(params_1, cfg, ctx, cont):
    """log p(cont | ctx) and whether cont is greedy, from model.forward over the pair's last
    seq_len + 1 tokens alone, on one device, summed in float64 here. (Zeros pad the row to seq_len,
    so that one compilation serves every pair: causal attention keeps them from the scored tokens.)"""
    seq = (ctx + cont)[-(cfg.seq_len + 1) :]
    T = len(seq) - 1
    tokens_1xS = np.zeros((1, cfg.seq_len), np.int32)
    tokens_1xS[0, :T] = seq[:-1]
    logits = _forward(params_1, tokens_1xS, np.arange(cfg.seq_len)[None], None, cfg=cfg)[0, :T]
    z_TxV = np.asarray(logits, np.float64)
    z_TxV = z_TxV - z_TxV.max(-1, keepdims=True)
    logp_TxV = z_TxV - np.log(np.exp(z_TxV).sum(-1, keepdims=True))
    scored = range(T - len(cont), T)
    total = sum(logp_TxV[t, seq[t + 1]] for t in scored)
    return total, all(int(np.argmax(logp_TxV[t])) == seq[t + 1] for t in scored)


def test_encode_pair_moves_the_contexts_trailing_spaces_to_the_continuation():
    assert tasks.encode_pair(BYTES, "Good morrow, ", "cousin") == (list(b"Good morrow,"), list(b" cousin"))
    assert tasks.encode_pair(BYTES, "", "The ") == ([BYTES.eot_id], list(b"The "))


def test_packed_scores_match_plain_forward_passes_on_a_sharded_mesh():
    """Every (context, choice) pair of the fixture, one a row in [8, 32] batches on a data x fsdp =
    4 x 2 mesh, against a forward pass of the pair alone on one device. The fixture has a context
    longer than the 32-token window (cut on the left), an empty one and more pairs than one batch."""
    cfg = preset("tiny", vocab_size=257)
    m = lm.get(cfg)
    mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2))
    # Gaussian weights drawn on the host (a jitted sharded init would compile for longer than the test runs)
    rng = np.random.default_rng(0)
    abstract = m.abstract_params()
    host = jax.tree.map(lambda a: rng.normal(0.0, 0.3, a.shape).astype(np.float32), abstract)
    params = jax.device_put(host, sharding.shardings(mesh, m.logical_axes(), abstract))
    enc = tasks.encode_task(tasks.read_task(TINY_MC), BYTES, cfg.seq_len)
    assert len(enc.pairs) > 8 and max(len(c) + len(x) for c, x in enc.pairs) > cfg.seq_len + 1
    with jax.set_mesh(mesh):
        logp, greedy = tasks.score(params, cfg, enc.pairs, rows=8)
    params_1 = jax.device_put(params, jax.devices()[0])
    hand = [_hand_logp(params_1, cfg, c, x) for c, x in enc.pairs]
    # Each token's log p rounds through the forward (its matmuls and attention), the log-sum-exp
    # over the vocabulary and then the sum over the continuation's <= 32 tokens: magnitude (the
    # largest |sum|, which bounds every term) x float32 eps x those terms (tests/tolerances.py).
    assert_close(logp, [h for h, _ in hand], loss_terms(cfg, cfg.seq_len))
    assert greedy.tolist() == [g for _, g in hand]


def test_accuracy_of_a_hand_made_case():
    """Example 1: the label (choice 0) has the largest sum, but choice 1 is 4x longer and only 2x
    less likely per character, so acc counts it and acc_norm does not. Example 2: a tie goes to the
    first choice, the label. Example 3: a cloze scored by whether its continuation is greedy."""
    logp = [np.array([-2.0, -4.0]), np.array([-1.0, -1.0]), np.array([-7.0])]
    greedy = [np.array([False, False]), np.array([False, True]), np.array([False])]
    chars = [np.array([1.0, 4.0]), np.array([3.0, 3.0]), np.array([5.0])]
    # example 1: acc right (-2 > -4); acc_norm wrong (-2/1 < -4/4); example 2 right both; example 3 wrong
    assert tasks.accuracy(logp, greedy, chars, [0, 0, 0]) == {"acc": 2 / 3, "acc_norm": 1 / 3}
    greedy[2] = np.array([True])
    assert tasks.accuracy(logp, greedy, chars, [1, 0, 0]) == {"acc": 2 / 3, "acc_norm": 1.0}


@pytest.mark.parametrize(
    "line, says",
    [
        ('{"choices": ["a", "b"], "label": 0}', "missing key 'context'"),
        ('{"context": "x", "choices": ["a", "b"], "label": 2}', "integer in [0, 2), not 2"),
        ('{"context": "x", "choices": ["a", "b"], "label": true}', "integer in [0, 2)"),
        ('{"context": "x", "choices": [], "label": 0}', "non-empty list of non-empty strings"),
        ('{"context": "x", "choices": ["a", "b"], "label": 0', "not valid JSON"),
    ],
)
def test_a_bad_task_line_is_one_error_naming_file_and_line(tmp_path, capsys, line, says):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "label": 0}\n' + line + "\n")
    # the task file is read before the checkpoint, so no checkpoint is needed to hear about it
    assert cli(["eval", "--checkpoint", str(tmp_path / "no-run"), "--task", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:2: ") and says in err[0], err


def test_task_files_of_one_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tiny_mc.jsonl").write_bytes(TINY_MC.read_bytes())
    with pytest.raises(DataError, match="share the name 'tiny_mc'"):
        tasks.read_tasks([TINY_MC, tmp_path / "a" / "tiny_mc.jsonl"])


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """experiments/tiny.py trained 2 steps on 8 devices, scoring the fixture task at steps 1 and 2."""
    cfg = load_config(ROOT / "experiments" / "tiny.py")
    cfg = apply_overrides(
        cfg,
        {
            "data.dir": tiny_data,
            "train.run_dir": str(tmp_path_factory.mktemp("runs")),
            "train.steps": "2",
            "train.eval_every": "1",
            "train.eval_batches": "1",
            "train.eval_tasks": str(TINY_MC),
            "mesh.data": "8",
        },
    )
    train.run(cfg)
    return cfg


def test_training_logs_task_accuracy_and_jaxlm_eval_task_reproduces_it(run, capsys):
    curves = report.read_curves(run.run_path / "tb", ("tasks/tiny_mc/acc", "tasks/tiny_mc/acc_norm"))
    assert [s for s, _ in curves["tasks/tiny_mc/acc"]] == [1, 2], curves
    assert all(0 <= v <= 1 for c in curves.values() for _, v in c)
    assert "| task tiny_mc | acc " in (run.run_path / "log.txt").read_text()
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(run.run_path), "--task", str(TINY_MC)]) == 0
    out = capsys.readouterr().out.strip()
    acc, acc_norm = (curves[f"tasks/tiny_mc/{k}"][-1][1] for k in ("acc", "acc_norm"))
    # 6 examples: accuracies are multiples of 1/6, far apart compared with any rounding
    assert out == f"step 2 | task tiny_mc | 6 examples | acc {acc:.4f} | acc_norm {acc_norm:.4f}", out


def test_the_shipped_task_is_what_its_script_writes():
    """The shipped task files are regenerated byte for byte from the corpus's validation works."""
    path = ROOT / "experiments" / "tasks" / "make_shakespeare_next_line.py"
    spec = importlib.util.spec_from_file_location("make_shakespeare_next_line", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    files = script.render()
    assert sorted(p.name for p in files) == ["shakespeare_next_line.jsonl", "shakespeare_word_order.jsonl"]
    for path, text in files.items():
        assert text == path.read_text(encoding="utf-8"), path
        task = tasks.read_task(path)
        assert len(task.examples) == 200 and all(len(set(ex.choices)) == 4 for ex in task.examples)
    # the word-order task asks about the same lines, each wrong choice made of the right one's words
    next_line, word_order = (tasks.read_task(p).examples for p in files)
    for a, b in zip(next_line, word_order, strict=True):
        assert a.context == b.context and a.label == b.label and a.choices[a.label] == b.choices[b.label]
        assert all(sorted(c.split()) == sorted(b.choices[b.label].split()) for c in b.choices)


# --------------------------------------------------------------------------------------------
# The lm-eval adapter: harness tasks over a local JSONL, nothing from a hub.
# --------------------------------------------------------------------------------------------

_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
{rest}
"""
_KINDS = {
    "jaxlm_tiny_mc": (
        "multiple_choice",
        'doc_to_text: "{{context}}"\ndoc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm",
    ),
    "jaxlm_tiny_rolling": (
        "loglikelihood_rolling",
        'doc_to_text: ""\ndoc_to_target: "{{context}}{{choices[label]}}"\n'
        "metric_list:\n  - metric: word_perplexity",
    ),
    "jaxlm_tiny_gen": (
        "generate_until",
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{choices[label]}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match',
    ),
}


def test_lm_eval_adapter_matches_jaxlms_own_scoring(run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # read at import: a module another test imported first must be told as well
    for module in ("huggingface_hub.constants", "datasets.config"):
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the datasets cache: not the user's
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    for name, (output_type, rest) in _KINDS.items():
        yaml = _YAML.format(name=name, data=TINY_MC, output_type=output_type, rest=rest)
        (tmp_path / f"{name}.yaml").write_text(yaml)
    out = tmp_path / "results.json"
    argv = ["lm-eval", "--checkpoint", str(run.run_path), "--tasks", ",".join(_KINDS)]
    assert cli([*argv, "--include-path", str(tmp_path), "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    samples = {name: sorted(results["samples"][name], key=lambda s: s["doc_id"]) for name in _KINDS}
    examples = tasks.read_task(TINY_MC).examples

    from jaxlm import checkpoint

    cfg, params, step, mesh = checkpoint.load_params(run.run_path)
    with jax.set_mesh(mesh):
        pairs = [tasks.encode_pair(BYTES, ex.context, c) for ex in examples for c in ex.choices]
        logp, _ = tasks.score(params, cfg.model, pairs, 8)
    # multiple choice: the harness's log-likelihoods are jaxlm's scorer's (the pairs may sit in other
    # rows of other batches: the rounding of one forward, as in the test above)
    harness = [r[0][0] for s in samples["jaxlm_tiny_mc"] for r in s["resps"]]
    assert_close(harness, logp, loss_terms(cfg.model, cfg.model.seq_len))
    # and its accuracies follow from them; unlike jaxlm's cloze rule, the harness counts a
    # single-choice example as always right
    bounds = np.cumsum([0] + [len(ex.choices) for ex in examples])
    right = [
        int(np.argmax(logp[a:b])) == ex.label for ex, a, b in zip(examples, bounds, bounds[1:], strict=False)
    ]
    assert results["results"]["jaxlm_tiny_mc"]["acc,none"] == np.mean(right)

    S = cfg.model.seq_len
    params_1 = jax.device_put(params, jax.devices()[0])
    # rolling log-likelihood: the text after the end-of-document token, in disjoint windows of
    # seq_len predictions, each from a plain forward pass over its own window
    for ex, s in zip(examples, samples["jaxlm_tiny_rolling"], strict=True):
        ids = BYTES.encode(ex.context + ex.choices[ex.label])
        full = [BYTES.eot_id, *ids]  # full[j] is the token before ids[j]
        # block [p, e) of ids is predicted from the window of <= S inputs ending at full[e - 1]
        bounds = [*range(0, len(ids), S), len(ids)]
        hand = sum(
            _hand_logp(params_1, cfg.model, full[max(0, e - S) : p + 1], full[p + 1 : e + 1])[0]
            for p, e in zip(bounds[:-1], bounds[1:], strict=True)
        )
        assert_close(s["resps"][0][0], hand, loss_terms(cfg.model, len(ids)))

    # generation: the argmax of a full forward pass, token by token from each context's last S
    # tokens (rope: the window may grow past S), cut before the first newline
    for ex, s in zip(examples, samples["jaxlm_tiny_gen"], strict=True):
        seq = BYTES.encode(ex.context)[-S:] or [BYTES.eot_id]
        for _ in range(6):
            tokens_1xW = np.zeros((1, S + 8), np.int32)
            tokens_1xW[0, : len(seq)] = seq
            logits = _forward(params_1, tokens_1xW, np.arange(S + 8)[None], None, cfg=cfg.model)
            seq.append(int(np.argmax(logits[0, len(seq) - 1])))
        want = BYTES.decode(seq[-6:]).split("\n")[0]
        assert s["resps"][0][0] == want, (ex.context, s["resps"])
