"""Tests for grpo.py, offline on CPU, in the order grpo.py explains things.

    python -m pytest -q test_grpo.py                   # everything (what CI runs)
    python -m pytest -q -m "not slow" test_grpo.py     # the math and rollout tests only

No download happens: a tiny random Qwen2 model and a byte-level BPE tokenizer of Qwen2's kind (the
four format tags and the chat markers as single tokens, a Qwen-like chat template) are built here, and
the data are small JSONL files written by the tests. Tests that start main() or a subprocess are
marked `slow`.
"""

import ast
import copy
import importlib
import inspect
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up must fail at once, not after retries
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `slow` is this file's only mark; registering it would need a pytest.ini, which the project does not have.
warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)

import grpo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# --- Helpers: a tiny offline chat model, data files, and ways to run grpo.py ---------------------------------------

TAGS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "Tom has 12 apples and gets 30 more. How many apples does Tom have now? 12 + 30 = 42.",
    "Ann had 50 cards and gave away 8. How many cards are left? 50 - 8 = 42.",
    "Respond in the following format: reasoning, then the answer. Add, subtract, multiply.",
    "0 1 2 3 4 5 6 7 8 9 10 12 20 30 40 50 100 + - * = total each more left boxes in",
] * 10


def build_tokenizer(corpus=CORPUS, vocab_size=330):
    """Byte-level BPE like Qwen2's, so transformers reloads it as a working Qwen2Tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    special = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if "vocab_file" in inspect.signature(Qwen2Tokenizer.__init__).parameters:  # transformers 4 reads files
        tokenizer = Qwen2Tokenizer(*bpe.save_model(tempfile.mkdtemp()), **special)
    else:  # transformers 5 takes the vocabulary and merges themselves
        merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
        tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, **special)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(TAGS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, seed=0):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    # Like Qwen2.5-Instruct: two end-of-turn ids (<|im_end|> and <|endoftext|>, which is also the pad).
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id,
        do_sample=True)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def tiny(tiny_dir):
    """A fresh (model, tokenizer) loaded the way main() loads them."""
    return grpo.load_model_and_tokenizer(tiny_dir, torch.device("cpu"))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def arithmetic_rows(n=40):
    rows = []
    for i in range(n):
        a, b = 3 + i % 17, 2 + (7 * i) % 13
        rows.append({"question": f"Tom has {a} apples and gets {b} more. How many apples does Tom have now?",
                     "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    return rows


def prompt_ids_for(tokenizer, question="Tom has 3 apples.", copies=1):
    """(copies, P) token ids of one chat prompt."""
    return tokenizer([grpo.build_prompt(tokenizer, question)] * copies, return_tensors="pt")["input_ids"]


def _train(model, tokenizer, examples, **overrides):
    """train_with_grpo with small settings (no output written)."""
    settings = dict(num_steps=1, batch_size=2, num_generations=4, max_completion_length=8, mu=2, beta=0.04,
                    learning_rate=1e-3, micro_batch_size=8, seed=0)
    settings.update(overrides)
    torch.manual_seed(settings["seed"])
    return grpo.train_with_grpo(model, tokenizer, examples, **settings)


def _two_updates(model, micro_batch_size, batch, **variant):
    """Gradients of two GRPO updates (the policy nudged in between) with the given micro-batch size,
    pi_old recorded by the first update as train_with_grpo does."""
    input_ids, attention_mask, completion_mask, advantages, ref_log_probs = batch
    log_prob_fn = grpo.LogProbModule(model, temperature=0.9)
    noise = torch.Generator().manual_seed(1)
    old, results = None, []
    for update in range(2):
        model.zero_grad(set_to_none=True)
        log_probs, totals = grpo.accumulate_grpo_gradients(log_prob_fn, input_ids, attention_mask, completion_mask,
                                                           advantages, old, ref_log_probs, micro_batch_size, 0.04, 0.2,
                                                           **variant)
        if update == 0:
            old = log_probs
        results.append((log_probs.clone(), totals["loss"].item(),
                        torch.cat([p.grad.flatten() for p in model.parameters()])))
        with torch.no_grad():  # move the policy so that the second update's ratio is not 1
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=noise), alpha=1e-2)
    return results


def _fake_replicate(module, monkeypatch):
    """What DataParallel does to a module on GPU 1, done on CPU: weights become plain attributes."""
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach=False: [[t.detach() for t in tensors] for _ in devices])
    replica = replicate_module.replicate(module, [0, 1], detach=True)[1]
    assert list(replica.model.parameters()) == []  # what breaks model.device in transformers
    return replica


TIMING_KEYS = {"step_seconds", "rollout_seconds", "update_seconds", "tokens_per_second",
               "generation_tokens_per_second", "train_tokens_per_second"}


def _run_flags(tiny_dir, data, out, *extra):
    return ["--model_name", tiny_dir, "--dataset", data, "--eval_size", "0", "--num_steps", "4", "--batch_size", "2",
            "--num_generations", "3", "--mu", "2", "--max_completion_length", "8", "--micro_batch_size", "4",
            "--device", "cpu", "--learning_rate", "1e-2", "--max_grad_norm", "1.0", "--output_dir", str(out),
            "--log_completions_steps", "0", *extra]


def _metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    from transformers import AutoModelForCausalLM

    return torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(path).parameters()])


def _main_error(argv):
    """main(argv)'s one-line error message (it must exit with one)."""
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(argv)
    assert isinstance(exit_info.value.code, str) and exit_info.value.code.startswith("error: ")
    assert "\n" not in exit_info.value.code  # one line
    return exit_info.value.code


def _signal_on_call(monkeypatch, function_name, call_number, signum):
    """Make grpo.<function_name> deliver `signum` to this process on its call_number-th call."""
    original, calls = getattr(grpo, function_name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call_number:
            signal.raise_signal(signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo, function_name, wrapper)


def _interrupt(flags, *cues, timeout=120):
    """Run grpo.py with flags in a subprocess; for each cue (marker, signal), wait until the marker
    appears in its output, then send the signal. Returns (exit code, stdout, stderr, seconds from the
    first signal to the exit)."""
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "grpo.py"), *flags], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    output, start = b"", None
    try:
        for marker, signum in cues:
            while marker.encode() not in output:  # read as it comes: progress lines end in \r, not \n
                chunk = os.read(process.stdout.fileno(), 4096)
                assert chunk, f"exited before {marker!r}: {output.decode()} {process.stderr.read().decode()}"
                output += chunk
            start = start or time.perf_counter()
            process.send_signal(signum)
        rest, stderr = process.communicate(timeout=timeout)
        return process.returncode, (output + rest).decode(), stderr.decode(), time.perf_counter() - start
    finally:
        process.kill()


def _advised(flags, stderr):
    """The command the last line of stderr advises: the same flags, plus --resume_from latest if it
    says so (and without --overwrite_output_dir if it says so)."""
    advice = stderr.strip().splitlines()[-1]
    assert "run the same command" in advice, advice
    if "without --overwrite_output_dir" in advice:
        flags = [flag for flag in flags if flag != "--overwrite_output_dir"]
    return flags + (["--resume_from", "latest"] if "--resume_from latest" in advice else [])


def _nan_advantages_on_steps(monkeypatch, bad_steps):
    original, calls = grpo.compute_group_advantages, []

    def wrapper(*args, **kwargs):
        calls.append(1)
        advantages = original(*args, **kwargs)
        return advantages * float("nan") if len(calls) in bad_steps else advantages

    monkeypatch.setattr(grpo, "compute_group_advantages", wrapper)


def same(a, b) -> bool:
    """Equal results: tensors close, modules and optimizers by state, containers element by element, else ==."""
    if isinstance(a, torch.Tensor):
        return torch.allclose(a.detach().float(), b.detach().float(), atol=1e-6)
    if isinstance(a, (torch.nn.Module, torch.optim.Optimizer)):
        return type(a) is type(b) and same(a.state_dict(), b.state_dict())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def copied(name):
    """grpo.<name> as a reader would copy it: its source, the definitions its docstring names after "Copy with:"
    and the import statements it names there ("Copy with: import torch; numbers_in."), executed in an empty
    namespace: nothing else is there."""
    source = open(os.path.join(HERE, "grpo.py"), encoding="utf-8").read()
    definitions = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = node
    listed = re.search(r"Copy with: (.+?)\.(?:\s|$)", ast.get_docstring(definitions[name]) or "", re.S)
    namespace, names = {}, []
    for part in " ".join(listed.group(1).split()).split(";") if listed else []:
        if part.strip().startswith(("import ", "from ")):
            exec(part.strip(), namespace)
        else:
            names += [n.strip() for n in part.split(",")]
    for part in names + [name]:  # helpers first, as a reader would paste them above
        exec(ast.get_source_segment(source, definitions[part]), namespace)
    return namespace[name]


# --- 1. Prompts and answer extraction ------------------------------------------------------------------------------


def test_system_prompt_is_the_seed_text():
    assert grpo.SYSTEM_PROMPT == "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"


def test_prompt_uses_the_chat_template(tiny):
    _, tokenizer = tiny
    prompt = grpo.build_prompt(tokenizer, "What is 2+2?")
    assert prompt == ("<|im_start|>system\n" + grpo.SYSTEM_PROMPT + "<|im_end|>\n"
                      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("text, expected", [
    ("<reasoning>r</reasoning><answer>42</answer>", "42"),
    ("<answer>\n 7 \n</answer>", "7"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last block counts
    ("<answer>1</answer> then <answer>2", None),  # the last one is unclosed
    ("<answer>...</answer>", None),  # the template's placeholder
    ("<answer></answer>", ""),
    ("no tags at all", None),
    ("", None),
    ("</answer><answer>", None),
])
def test_model_answer_is_the_last_closed_answer_block(text, expected):
    assert grpo.extract_answer_from_model_output(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("She sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,080", "1,080"),
    ("####-5 ", "-5"),
    ("no delimiter 72", None),
])
def test_dataset_answer_is_the_text_after_the_delimiter(text, expected):
    assert grpo.extract_answer_from_dataset(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("72", 72.0), ("$1,080", 1080.0), ("1,234,567.5", 1234567.5), ("-3.5", -3.5), ("+7", 7.0),
    ("50%", 50.0), (".5", 0.5), ("The answer is 72.", 72.0), ("x = -12 dollars", -12.0),
    ("3 or 4", None), ("1,2", None), ("", None), ("seventy-two", None), ("5-3", None),
])
def test_single_number_is_found_only_when_the_text_holds_exactly_one(text, expected):
    assert grpo.extract_single_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("3 apples and 4 pears make 7.", 7.0), ("total: $1,080", 1080.0), ("none", None), ("-2 then -9", -9.0),
])
def test_last_number_is_the_final_number_in_the_text(text, expected):
    assert grpo.extract_last_number(text) == expected


def test_docstring_examples_run():
    import doctest

    assert doctest.testmod(grpo, raise_on_error=False).failed == 0


# --- 2. Rewards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, answer, expected", [
    ("<answer>72</answer>", "72", 2.0),
    ("<answer> 72 </answer>", "72", 2.0),
    ("<answer>1,080</answer>", "1,080", 2.0),
    ("<answer>$1,080</answer>", "1080", 1.5),
    ("<answer>72.0</answer>", "72", 1.5),
    ("<answer>1080</answer>", "1,080", 1.5),
    ("<answer>72 apples</answer>", "72", 1.5),
    ("<answer>71</answer>", "72", 0.0),
    ("<answer>72 or 73</answer>", "72", 0.0),
    ("<answer>72", "72", 0.0),
    ("The answer is 72", "72", 0.0),
    ("<answer>...</answer>", "...", 0.0),
    ("", "72", 0.0),
    ("<answer>\x00\ud7ff 🙂</answer>", "72", 0.0),
])
def test_correctness_reward_is_2_for_the_same_text_1_5_for_the_same_number_else_0(completion, answer, expected):
    assert grpo.correctness_reward([completion], [answer]) == [expected]


@pytest.mark.parametrize("completion, expected", [
    ("<reasoning>r</reasoning><answer>1</answer>", 0.8),
    ("<reasoning>r</reasoning>", 0.4),
    ("</answer>", 0.2),
    ("<reasoning><reasoning>", 0.2),  # presence, not count
    ("nothing", 0.0),
    ("", 0.0),
])
def test_format_reward_is_0_2_per_distinct_tag_present(completion, expected):
    assert grpo.format_reward([completion]) == pytest.approx([expected])


def test_combined_reward_is_the_sum_and_spans_0_to_2_8():
    completions = ["<reasoning>r</reasoning><answer>72</answer>", "<answer>$72</answer>", "junk", ""]
    answers = ["72", "72", "72", "72"]
    combined = grpo.combined_reward(completions, answers)
    assert combined == pytest.approx([2.8, 1.9, 0.0, 0.0])
    parts = [c + f for c, f in zip(grpo.correctness_reward(completions, answers), grpo.format_reward(completions))]
    assert combined == pytest.approx(parts)


# --- 3. Advantages -------------------------------------------------------------------------------------------------


def test_advantages_match_worked_example():
    # The seed's example: batch_size 2, num_generations 3.
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    advantages = grpo.compute_group_advantages(rewards, num_generations=3)
    assert advantages.shape == (6, 1)
    assert torch.allclose(advantages.squeeze(1), torch.tensor([-1.0, 0.0, 1.0, -1.0, 0.0, 1.0]), atol=1e-3)


@pytest.mark.parametrize("num_generations", [2, 3, 4, 7, 8, 16])
def test_advantages_of_equal_rewards_are_exactly_zero_at_every_group_size_and_reward_level(num_generations):
    # In float32 the mean of G equal rewards can be one rounding step off (G = 8, r = 2.8): without
    # special care that error / 1e-4 becomes an advantage of about 5e-3.
    levels = [0.0, 0.2, 0.4, 0.6, 0.8, 1.5, 1.7, 1.9, 2.0, 2.2, 2.4, 2.6, 2.8]
    rewards = torch.tensor([level for level in levels for _ in range(num_generations)])  # one group per level
    advantages = grpo.compute_group_advantages(rewards, num_generations)
    assert torch.equal(advantages, torch.zeros(len(rewards), 1))


def test_advantages_use_the_unbiased_group_std():
    rewards = torch.tensor([0.0, 2.8, 0.4, 1.0])
    mean = sum(rewards.tolist()) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards.tolist()) / 3)  # divisor G - 1
    expected = [(r - mean) / (std + 1e-4) for r in rewards.tolist()]
    assert grpo.compute_group_advantages(rewards, 4).squeeze(1).tolist() == pytest.approx(expected, rel=1e-5)


def test_batch_and_unscaled_advantages_match_hand_computation():
    rewards = [0.0, 2.8, 0.4, 1.0, 2.0, 2.0, 0.2, 1.7]  # G = 4: two groups
    means = [sum(rewards[:4]) / 4, sum(rewards[4:]) / 4]
    centered = [r - means[i // 4] for i, r in enumerate(rewards)]
    batch_mean = sum(rewards) / 8
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in rewards) / 7)  # unbiased, over all N
    got_none = grpo.compute_group_advantages(torch.tensor(rewards), 4, scale_rewards="none").squeeze(1).tolist()
    got_batch = grpo.compute_group_advantages(torch.tensor(rewards), 4, scale_rewards="batch").squeeze(1).tolist()
    assert got_none == pytest.approx(centered, abs=1e-6)
    assert got_batch == pytest.approx([c / (batch_std + 1e-4) for c in centered], rel=1e-5, abs=1e-6)
    equal_group = torch.tensor([2.8] * 8 + [0.0, 1.0] * 4)  # next to a group that differs
    for scale in ("group", "batch", "none"):
        advantages = grpo.compute_group_advantages(equal_group, 8, scale)
        assert torch.equal(advantages[:8], torch.zeros(8, 1)) and advantages[9] > 0 > advantages[8], scale


def test_advantages_reject_a_group_of_one():
    with pytest.raises(ValueError):
        grpo.compute_group_advantages(torch.tensor([1.0, 2.0]), 1)


# --- 4. Log-probabilities and the completion mask (and engineering A, the in-place backward) -----------------------


def _plain_log_probs(logits, token_ids, temperature=1.0):
    """The independent reference: a full log_softmax, then gather."""
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def test_selective_log_softmax_value_and_gradient_match_autograd_and_leave_its_input_alone():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, dtype=torch.float64) * 3
    token_ids = torch.randint(0, 7, (3, 4))
    weights = torch.randn(3, 4, dtype=torch.float64)  # an arbitrary upstream gradient
    reference = logits.clone().requires_grad_(True)
    expected = _plain_log_probs(reference, token_ids, 0.7)
    (expected * weights).sum().backward()
    leaf = logits.clone().requires_grad_(True)
    given = leaf * 1.0
    got = grpo.selective_log_softmax(given, token_ids, 0.7)  # float32 inside
    (got * weights).sum().backward()
    assert torch.allclose(got.double(), expected.detach(), atol=1e-5)
    assert torch.allclose(leaf.grad, reference.grad, atol=1e-6)
    assert torch.equal(given.detach(), logits)  # side-effect free


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_in_place_log_softmax_value_and_gradient_match_autograd(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, dtype=torch.float64) * 3
    token_ids = torch.randint(0, 7, (3, 4))
    weights = torch.randn(3, 4, dtype=torch.float64)
    reference = logits.clone().requires_grad_(True)
    expected = _plain_log_probs(reference, token_ids, temperature)
    (expected * weights).sum().backward()
    leaf = logits.clone().requires_grad_(True)
    got = grpo.InPlaceSelectiveLogSoftmax.apply(leaf * 1.0, token_ids, temperature)
    assert torch.allclose(got.double(), expected.detach(), atol=1e-6)  # the forward works in float32
    (got.double() * weights).sum().backward()
    assert torch.allclose(leaf.grad, reference.grad, atol=1e-6)


def test_temperature_is_applied_in_float32_for_bf16_logits():
    # bf16 logits of a realistic size: logit / T rounded to bf16 first would be off by up to ~1e-2.
    torch.manual_seed(0)
    logits = (torch.randn(2, 6, 50) * 8).to(torch.bfloat16)
    token_ids = torch.randint(0, 50, (2, 6))
    exact = _plain_log_probs(logits.double(), token_ids, 0.7)  # what the bf16 logits mean, in float64
    got = grpo.InPlaceSelectiveLogSoftmax.apply(logits.clone(), token_ids, 0.7)
    assert (got.double() - exact).abs().max() < 1e-5
    rounded_first = _plain_log_probs((logits / 0.7).double(), token_ids)  # the old way: logits.div_(T) in bf16
    assert (rounded_first - exact).abs().max() > 1e-3  # so the check above can tell the two apart


def test_compute_log_probs_matches_plain_log_softmax_with_left_padding_and_temperature(tiny):
    model, tokenizer = tiny
    model.eval()
    torch.manual_seed(1)
    pad, temperature, completion_length = tokenizer.pad_token_id, 0.7, 5
    # Three sequences with 0, 2 and 3 left-padding tokens, each prompt (4, 2, 1 tokens) + 5 completion tokens.
    real = [torch.randint(0, 300, (n,)) for n in (9, 7, 6)]
    input_ids = torch.stack([torch.cat([torch.full((9 - len(r),), pad), r]) for r in real])  # (3, 9)
    attention_mask = (torch.arange(9) >= torch.tensor([0, 2, 3]).unsqueeze(1)).long()  # (3, 9)
    with torch.no_grad():
        got = grpo.compute_log_probs(model, input_ids, attention_mask, completion_length, temperature)
        # Independent reference: each sequence alone, unpadded, full logits, full log_softmax.
        for row, tokens in enumerate(real):
            logits = model(input_ids=tokens.unsqueeze(0)).logits[0]  # (L, V)
            log_probs = torch.log_softmax(logits[:-1] / temperature, dim=-1)  # position t scores token t+1
            expected = log_probs.gather(-1, tokens[1:].unsqueeze(-1)).squeeze(-1)[-completion_length:]
            assert torch.allclose(got[row], expected, atol=1e-4), row
    assert got.shape == (3, completion_length)


def test_the_in_place_backward_refuses_a_second_backward_pass(tiny):
    model, tokenizer = tiny
    input_ids = torch.cat([prompt_ids_for(tokenizer, copies=2), torch.randint(0, 300, (2, 4))], dim=1)
    log_probs = grpo.LogProbModule(model, 1.0)(input_ids, torch.ones_like(input_ids), 4)  # the in-place backward
    log_probs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        log_probs.sum().backward()


@pytest.mark.parametrize("row, expected", [
    ([5, 6, 9, 7, 7], [1, 1, 1, 0, 0]),  # EOS in the middle: kept, the rest masked
    ([9, 5, 6, 7, 7], [1, 0, 0, 0, 0]),  # EOS first
    ([5, 6, 7, 8, 9], [1, 1, 1, 1, 1]),  # EOS last
    ([5, 6, 7, 8, 4], [1, 1, 1, 1, 1]),  # no EOS: cut at the length limit, all kept
    ([5, 9, 9, 3, 9], [1, 1, 0, 0, 0]),  # repeated EOS: the first one ends it
    ([5, 3, 9, 3, 3], [1, 1, 0, 0, 0]),  # the second EOS id (also the pad id) ends it too
    ([3, 3, 3, 3, 3], [1, 0, 0, 0, 0]),
])
def test_completion_mask_ends_at_the_first_eos(row, expected):
    mask = grpo.create_completion_mask(torch.tensor([row]), eos_token_ids=[9, 3])
    assert mask.tolist() == [expected]
    assert grpo.truncated_completions(torch.tensor([row]), [9, 3]).tolist() == [row == [5, 6, 7, 8, 4]]  # no EOS


def test_end_of_sequence_ids_include_every_end_of_turn_token(tiny):
    model, tokenizer = tiny
    assert grpo.end_of_sequence_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, tokenizer.pad_token_id})


# --- 5. The loss ---------------------------------------------------------------------------------------------------


def test_grpo_loss_matches_hand_computation():
    logp = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]]
    old = [[-1.4, -1.5, -0.5], [-0.9, -0.5, -2.0]]
    ref = [[-0.9, -2.5, -0.4], [-0.2, -1.1, -3.0]]
    adv, mask = [1.5, -0.5], [[1, 1, 0], [1, 1, 1]]
    beta, eps = 0.04, 0.2
    per_sequence = []
    for i in range(2):
        total = 0.0
        for t in range(3):
            ratio = math.exp(logp[i][t] - old[i][t])
            surrogate = min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            total += mask[i][t] * (surrogate - beta * kl)
        per_sequence.append(total / sum(mask[i]))
    expected = -sum(per_sequence) / 2

    loss, metrics = grpo.grpo_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(ref),
                                   torch.tensor(adv).unsqueeze(1), torch.tensor(mask), beta, eps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Clipped tokens (the clipped term is the smaller, so no gradient): seq 0 token 0 (ratio 1.49 > 1.2
    # with A > 0) and seq 1 token 1 (ratio 0.50 < 0.8 with A < 0); seq 0 token 1 (ratio 0.61, A > 0) and
    # seq 1 token 0 (ratio 1.82, A < 0) are not clipped. Per-sequence shares 1/2 and 1/3.
    assert metrics["clip_ratio"].item() == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert metrics["kl"].item() > 0


def _hand_loss(logp, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, level, max_len, delta=None,
               use_bias_correction_kl=False, off_policy_mask_threshold=None, tau=(1.0, 1.05)):
    """The GRPO family's loss written token by token from the papers' formulas, with scalar tensor
    arithmetic so that autograd gives its gradient with respect to logp (an (N, T) float64 leaf)."""
    n_seq, n_tok = len(mask), len(mask[0])
    objective = {}
    for i in range(n_seq):
        length = max(sum(mask[i]), 1)
        sequence_ratio = torch.exp(sum(mask[i][t] * (logp[i, t] - old[i][t]) for t in range(n_tok)) / length)
        drift = sum(mask[i][t] * (old[i][t] - logp[i, t].item()) for t in range(n_tok)) / length  # DeepSeek-V3.2
        kept = off_policy_mask_threshold is None or adv[i] >= 0 or drift <= off_policy_mask_threshold
        for t in range(n_tok):
            ratio = sequence_ratio if level == "sequence" else torch.exp(logp[i, t] - old[i][t])
            if loss_type == "cispo":  # the weight is a plain number: no gradient flows through it
                surrogate = min(ratio.item(), 1 + eps_high) * adv[i] * logp[i, t]
            elif loss_type == "sapo":
                temperature = tau[0] if adv[i] > 0 else tau[1]
                surrogate = torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * adv[i]
            else:
                capped = ratio if delta is None else torch.clamp(ratio, max=delta)
                clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
                surrogate = torch.minimum(capped * adv[i], clipped * adv[i])
            kl = torch.exp(ref[i][t] - logp[i, t]) - (ref[i][t] - logp[i, t]) - 1
            kl = kl * ratio if use_bias_correction_kl else kl
            objective[i, t] = mask[i][t] * (surrogate * kept - beta * kl)
    if loss_type in ("grpo", "sapo"):
        total = sum(sum(objective[i, t] for t in range(n_tok)) / max(sum(mask[i]), 1) for i in range(n_seq)) / n_seq
    elif loss_type in ("dapo", "cispo"):
        total = sum(objective.values()) / sum(map(sum, mask))
    else:  # dr_grpo
        total = sum(objective.values()) / (n_seq * max_len)
    return -total


def _variant_loss_and_gradient(logp, old, ref, adv, mask, beta, eps, max_len, **variant):
    """grpo_loss on float64 copies: (loss, gradient with respect to logp, metrics)."""
    leaf = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    loss, metrics = grpo.grpo_loss(leaf, torch.tensor(old, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                                   torch.tensor(adv, dtype=torch.float64).unsqueeze(1), torch.tensor(mask), beta, eps,
                                   max_completion_length=max_len, **variant)
    loss.backward()
    return loss, leaf.grad, metrics


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("term", [{}, {"delta": 4.0}, {"use_bias_correction_kl": True},
                                  {"off_policy_mask_threshold": 0.25}], ids=["plain", "delta", "unbiased_kl", "mask"])
def test_every_loss_variant_matches_hand_computation_in_value_and_gradient(loss_type, level, epsilon_high, term):
    # Row 3 (A < 0) has ratios far from 1 (e^2.2 = 9.0 > delta, e^-2.5) and mean(p_old - p) 0.275 > 0.25:
    # the mask drops it; row 4 is empty (A < 0, nothing to measure: kept).
    logp = [[-1.0, -2.0, -0.5, -0.7], [-0.3, -1.2, -2.2, -0.1], [-0.8, -0.6, -1.9, -1.1], [-0.2, -3.0, -1.0, -0.5],
            [-1.0, -1.0, -1.0, -1.0]]
    old = [[-1.4, -1.5, -0.5, -0.9], [-0.9, -0.5, -2.0, -0.4], [-0.5, -0.9, -1.6, -1.3], [-2.4, -0.5, -0.2, -0.5],
           [-0.2, -0.3, -0.4, -0.5]]
    ref = [[-0.9, -2.5, -0.4, -0.6], [-0.2, -1.1, -3.0, -0.2], [-0.7, -0.5, -2.0, -1.0], [-0.4, -2.6, -1.1, -0.9],
           [-1.0, -1.0, -1.0, -1.0]]
    adv, mask = [1.5, -0.5, 0.8, -1.2, -1.0], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    beta, eps, max_len = 0.04, 0.2, 6
    hand_leaf = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    expected = _hand_loss(hand_leaf, old, ref, adv, mask, beta, eps, epsilon_high or eps, loss_type, level, max_len,
                          **term)
    expected.backward()
    loss, gradient, metrics = _variant_loss_and_gradient(logp, old, ref, adv, mask, beta, eps, max_len,
                                                         epsilon_high=epsilon_high, loss_type=loss_type,
                                                         importance_sampling_level=level, **term)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert torch.allclose(gradient, hand_leaf.grad, atol=1e-12)
    assert metrics["clip_ratio"].item() == pytest.approx(metrics["clip_ratio_low"].item() + metrics["clip_ratio_high"].item())
    assert ("off_policy_masked" in metrics) == ("off_policy_mask_threshold" in term)
    if "off_policy_mask_threshold" in term:
        assert metrics["off_policy_masked"].item() == pytest.approx(1 / 5)  # row 3


def test_clip_higher_keeps_the_gradient_of_tokens_between_the_two_limits():
    # rho = 1.25, A > 0: clipped at 1 + 0.2 (no gradient) but not at 1 + 0.28 (gradient).
    logp, old = torch.tensor([[0.0]], requires_grad=True), torch.tensor([[-math.log(1.25)]])
    for epsilon_high, has_gradient, high in ((None, False, 1.0), (0.28, True, 0.0)):
        logp.grad = None
        loss, metrics = grpo.grpo_loss(logp, old, None, torch.tensor([[1.0]]), torch.ones(1, 1), 0.0, 0.2,
                                       epsilon_high=epsilon_high)
        loss.backward()
        assert (logp.grad.abs().item() > 0) == has_gradient and metrics["clip_ratio_high"].item() == high


def test_sequence_level_ratio_is_one_number_per_completion():
    # GSPO: tokens with opposite log-ratios cancel in s_i, so nothing is clipped though each token ratio would be.
    logp = torch.tensor([[0.0, 0.0]])
    old = torch.tensor([[0.5, -0.5]])  # token ratios exp(-0.5), exp(0.5): both outside [0.8, 1.2]
    args = (logp, old, None, torch.tensor([[1.0]]), torch.ones(1, 2), 0.0, 0.2)
    assert grpo.grpo_loss(*args)[1]["clip_ratio"].item() > 0
    loss, metrics = grpo.grpo_loss(*args, importance_sampling_level="sequence")
    assert metrics["clip_ratio"].item() == 0.0 and loss.item() == pytest.approx(-1.0)  # s = exp(0) = 1


def test_cispo_caps_the_weight_at_1_plus_epsilon_high_and_keeps_every_tokens_gradient():
    # rho = 1.25, 4 (A > 0) and 4 (A < 0); the cap is 1 + 0.28 (TRL's would be 0.28): the last two are capped.
    logp = torch.log(torch.tensor([[1.25, 4.0], [4.0, 1.0]])).requires_grad_()
    loss, metrics = grpo.grpo_loss(logp, torch.zeros(2, 2), None, torch.tensor([[1.0], [-1.0]]),
                                   torch.tensor([[1, 1], [1, 0]]), 0.0, 0.2, epsilon_high=0.28, loss_type="cispo")
    loss.backward()
    # d loss / d p = -min(rho, 1.28) * A / 3, a mean over the 3 tokens (as dapo); no gradient through the weight
    assert torch.allclose(logp.grad, torch.tensor([[-1.25, -1.28], [1.28, 0.0]]) / 3)
    assert metrics["cispo_clip_ratio"].item() == pytest.approx((1 / 2 + 1) / 2) and metrics["clip_ratio"].item() == 0


def test_the_off_policy_mask_drops_only_negative_completions_past_the_threshold():
    # mean over the unpadded tokens of p_old - p: 0.5 with A < 0 (at the threshold: kept, the test is strict),
    # 0.75 with A < 0 (dropped; 0.375 if the padding were counted), 0.5 and 0.75 with A > 0 (kept).
    logp = torch.full((4, 2), -1.0, requires_grad=True)
    old = torch.tensor([[-0.5, -0.5], [-0.25, -1.0], [-0.5, -0.5], [-0.25, -0.25]])
    advantages, mask = torch.tensor([[-1.0], [-1.0], [1.0], [1.0]]), torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    loss, metrics = grpo.grpo_loss(logp, old, None, advantages, mask, 0.0, 0.2, loss_type="sapo",
                                   off_policy_mask_threshold=0.5)
    loss.backward()
    assert metrics["off_policy_masked"].item() == 0.25
    assert (logp.grad[1] == 0).all() and (logp.grad[[0, 2, 3]] != 0).all()


def test_kl_is_zero_when_policy_equals_reference():
    torch.manual_seed(0)
    logp = torch.randn(4, 6)
    advantages = torch.tensor([[1.0], [-2.0], [0.5], [0.25]])
    loss_with_kl, metrics = grpo.grpo_loss(logp, logp, logp.clone(), advantages, torch.ones(4, 6), 0.5, 0.2)
    loss_without_kl, _ = grpo.grpo_loss(logp, logp, None, advantages, torch.ones(4, 6), 0.0, 0.2)
    assert metrics["kl"].item() == 0.0
    # With ratio 1 and KL 0 everywhere the loss is minus the mean advantage, whatever beta is.
    assert loss_with_kl.item() == pytest.approx(-advantages.mean().item())
    assert loss_without_kl.item() == pytest.approx(loss_with_kl.item())


def test_padding_gets_no_gradient():
    logp = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    loss, _ = grpo.grpo_loss(logp, logp.detach(), logp.detach() - 0.1, torch.tensor([[1.0], [-1.0]]), mask, 0.04, 0.2)
    loss.backward()
    assert torch.equal(logp.grad[0, 2:], torch.zeros(2))
    assert (logp.grad[0, :2] != 0).all()


def test_one_update_raises_positive_and_lowers_negative_advantage_completions(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    completions = torch.randint(0, 300, (2, 6))  # (2, T)
    input_ids = torch.cat([prompt_ids_for(tokenizer, copies=2), completions], dim=1)  # (2, P + T)
    attention_mask = torch.ones_like(input_ids)
    advantages = torch.tensor([[1.0], [-1.0]])  # completion 0 good, completion 1 bad
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    log_probs = grpo.compute_log_probs(model, input_ids, attention_mask, 6)
    before = log_probs.detach().sum(dim=1)
    loss, _ = grpo.grpo_loss(log_probs, log_probs.detach(), log_probs.detach(), advantages,
                             torch.ones(2, 6), beta=0.04, epsilon=0.2)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = grpo.compute_log_probs(model, input_ids, attention_mask, 6).sum(dim=1)  # (2,)
    assert after[0] > before[0]
    assert after[1] < before[1]


# --- 6. Rollouts and evaluation (and engineering B: exact sampling, DataParallel) ----------------------------------


def test_generate_completions_groups_and_masks(tiny):
    model, tokenizer = tiny
    model.eval()
    eos = grpo.end_of_sequence_ids(model, tokenizer)
    prompts = [grpo.build_prompt(tokenizer, q) for q in ("Tom has 3 apples.", "A much longer question " * 3)]
    torch.manual_seed(0)
    prompt_ids, prompt_mask, completion_ids, completion_mask = grpo.generate_completions(
        model, tokenizer, prompts, 3, 12, 1.0, eos)
    assert prompt_ids.shape[0] == completion_ids.shape[0] == 6
    assert completion_ids.shape == completion_mask.shape and completion_ids.shape[1] <= 12
    # Each prompt is repeated G times consecutively, left-padded (the real tokens end at column P).
    assert torch.equal(prompt_ids[0], prompt_ids[2]) and torch.equal(prompt_ids[3], prompt_ids[5])
    assert prompt_mask[:, -1].all() and not prompt_mask[0, 0]
    assert torch.equal(completion_mask, grpo.create_completion_mask(completion_ids, eos))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("sampler", ["sample_sequences", "sample_exactly"])
def test_rollouts_sample_from_softmax_at_the_temperature_not_the_checkpoints_settings(tiny, sampler, temperature):
    model, tokenizer = tiny
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(8)  # sharper logits: a top-20 filter would cut 20-55% of the mass
    config = model.generation_config  # settings of the kind Qwen2.5-Instruct ships (top_k 20, top_p 0.8, ...)
    config.top_k, config.top_p, config.repetition_penalty, config.temperature = 20, 0.8, 1.5, 0.3
    prompt = tokenizer(["Tom has 3 apples."], return_tensors="pt")["input_ids"].repeat(4000, 1)  # (n, P)
    settings = dict(max_new_tokens=1, temperature=temperature, eos_token_ids=grpo.end_of_sequence_ids(model, tokenizer),
                    pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    uniforms = (torch.rand(len(prompt), 1),) if sampler == "sample_exactly" else ()
    drawn = getattr(grpo, sampler)(model, prompt, torch.ones_like(prompt), *uniforms, **settings)[:, -1]  # (n,)
    with torch.no_grad():
        expected = torch.softmax(model(prompt[:1]).logits[0, -1].double() / temperature, dim=-1) * len(prompt)  # (V,)
    # Pearson's chi-square over the tokens expected at least 5 times, the rest in one bin.
    observed, kept = torch.bincount(drawn, minlength=len(expected)).double(), expected >= 5
    observed = torch.cat([observed[kept], observed[~kept].sum().view(1)])
    expected = torch.cat([expected[kept], expected[~kept].sum().view(1)])
    chi_square, dof = ((observed - expected) ** 2 / expected).sum().item(), len(expected) - 1
    assert chi_square < dof + 6 * math.sqrt(2 * dof), (chi_square, dof)  # ~6 standard deviations


def test_a_rollout_depends_neither_on_how_it_is_split_nor_on_the_checkpoints_sampling_settings(tiny):
    model, tokenizer = tiny
    model.eval()
    eos = grpo.end_of_sequence_ids(model, tokenizer)
    generator = grpo.GenerateModule(model, max_new_tokens=10, temperature=1.0, eos_token_ids=eos,
                                    pad_token_id=tokenizer.pad_token_id)
    prompt_ids = prompt_ids_for(tokenizer, copies=8)
    mask, uniforms = torch.ones_like(prompt_ids), torch.rand(8, 10)
    with torch.no_grad():
        plain = generator(prompt_ids, mask, uniforms)  # one device
        halves = torch.cat([generator(prompt_ids[:3], mask[:3], uniforms[:3]),  # two replicas' shares
                            generator(prompt_ids[3:], mask[3:], uniforms[3:])])
        # A checkpoint whose generation_config would change the sampling (Qwen2.5-Instruct ships top_k 20,
        # top_p 0.8, repetition_penalty 1.05): under the same random numbers the rollout must not change.
        config = model.generation_config
        config.top_k, config.top_p, config.repetition_penalty, config.temperature = 1, 0.1, 5.0, 0.3
        with_settings = generator(prompt_ids, mask, uniforms)
    assert torch.equal(halves, plain) and torch.equal(with_settings, plain)
    assert len({tuple(row) for row in plain.tolist()}) > 1  # sampled (top_k = 1 would make every row alike)


def test_the_dataparallel_wrappers_run_on_a_replica(tiny, monkeypatch):
    model, tokenizer = tiny
    model.eval()
    eos = grpo.end_of_sequence_ids(model, tokenizer)
    prompt_ids = prompt_ids_for(tokenizer)
    generator = grpo.GenerateModule(model, max_new_tokens=6, temperature=None, eos_token_ids=eos,
                                    pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = generator(prompt_ids, torch.ones_like(prompt_ids))
        got = _fake_replicate(generator, monkeypatch)(prompt_ids, torch.ones_like(prompt_ids))
    assert got.shape == (1, prompt_ids.size(1) + 6)  # padded to a fixed width for the gather
    assert torch.equal(got, expected)  # greedy: the replica generates what the model does
    sampler = grpo.GenerateModule(model, max_new_tokens=6, temperature=1.0, eos_token_ids=eos,
                                  pad_token_id=tokenizer.pad_token_id)
    uniforms = torch.rand(1, 6)
    with torch.no_grad():
        assert torch.equal(_fake_replicate(sampler, monkeypatch)(prompt_ids, torch.ones_like(prompt_ids), uniforms),
                           sampler(prompt_ids, torch.ones_like(prompt_ids), uniforms))

    log_prob_module = grpo.LogProbModule(model, temperature=1.0)
    with torch.no_grad():
        expected = log_prob_module(got, torch.ones_like(got), 6)
        replica_log_probs = _fake_replicate(log_prob_module, monkeypatch)(got, torch.ones_like(got), 6)
    assert torch.allclose(replica_log_probs, expected)


def test_loading_a_model_switches_off_the_attention_kernel_that_nans_on_padded_rows(tiny_dir):
    import threading

    torch.backends.cuda.enable_cudnn_sdp(True)  # torch's default
    grpo.load_model_and_tokenizer(tiny_dir, torch.device("cpu"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()
    seen = []  # a process-wide switch: DataParallel's replica threads see it too
    thread = threading.Thread(target=lambda: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    thread.start()
    thread.join()
    assert seen == [False]


def test_left_padded_rows_attend_to_nothing_without_a_nan_on_cpu(tiny):
    # What the GPU fix guards against, on the CPU's kernels: fully masked rows give finite outputs here.
    model, tokenizer = tiny
    input_ids = torch.cat([torch.full((1, 3), tokenizer.pad_token_id), prompt_ids_for(tokenizer)], dim=1)
    attention_mask = (input_ids != tokenizer.pad_token_id).long()
    attention_mask[0, 3:] = 1
    log_probs = grpo.compute_log_probs(model, input_ids, attention_mask, 4)
    log_probs.sum().backward()
    assert torch.isfinite(log_probs).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_evaluate_model_scores_strict_and_lenient(tiny, monkeypatch):
    model, tokenizer = tiny
    texts = ["<reasoning>r</reasoning><answer>7</answer>", "so the answer is 5", "<answer>4</answer>, I mean 3"]
    monkeypatch.setattr(grpo, "decode_completions", lambda *args: texts)
    model.train()
    examples = [{"question": "q1", "answer": "7"}, {"question": "q2", "answer": "5"}, {"question": "q3", "answer": "3"}]
    result = grpo.evaluate_model(model, tokenizer, examples, max_new_tokens=4, batch_size=3)
    assert result["strict_accuracy"] == pytest.approx(1 / 3)  # only the first has the right <answer>
    assert result["lenient_accuracy"] == pytest.approx(3 / 3)  # the last number is right in all three
    assert model.training  # the mode is restored


# --- 8. A cold start ----------------------------------------------------------------------------------------------


def test_a_cold_start_target_is_the_worked_solution_in_the_rewarded_format_and_earns_the_full_reward():
    target = grpo.sft_completion("She sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.", "72")
    assert target == "<reasoning>\nShe sold 48/2 = 24 clips.\nIn all 48+24 = 72.\n</reasoning>\n<answer>\n72\n</answer>"
    assert grpo.combined_reward([target], ["72"]) == [2.8]


def test_sft_loss_is_the_mean_log_likelihood_of_the_completion_tokens_and_their_end_of_turn(tiny):
    model, tokenizer = tiny
    prompts = [grpo.build_prompt(tokenizer, q) for q in ("Tom has 3 apples.", "A much longer question " * 3)]
    completions = ["<answer>42</answer>", "12 + 30"]
    terms = []  # each sequence alone, unpadded, through a full log_softmax
    for prompt, completion in zip(prompts, completions):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        log_probs = torch.log_softmax(model(torch.tensor([p + c])).logits[0].double(), dim=-1)  # (L, V)
        terms += [log_probs[len(p) - 1 + t, token] for t, token in enumerate(c)]
    loss = grpo.sft_loss(model, tokenizer, prompts, completions)
    assert loss.item() == pytest.approx(-torch.stack(terms).mean().item(), rel=1e-5)


@pytest.mark.slow
def test_a_cold_start_teaches_the_format_to_a_model_that_never_writes_it():
    train, held_out = toy_split(0)
    model, tokenizer = build_toy_model(0)
    eos = grpo.end_of_sequence_ids(model, tokenizer)
    prompts = [grpo.build_prompt(tokenizer, ex["question"]) for ex in held_out]

    def format_reward():
        completions = grpo.generate_completions(model.eval(), tokenizer, prompts, 1, 12, None, eos)[2:]
        return sum(grpo.format_reward(grpo.decode_completions(tokenizer, *completions))) / len(prompts)

    assert format_reward() < 0.1
    losses = grpo.cold_start(model, tokenizer, [{**ex, "solution": "count"} for ex in train], steps=40,
                             batch_size=16, learning_rate=3e-3, seed=0)
    assert losses[-1] < losses[0] / 4 and format_reward() == pytest.approx(0.8)


def test_the_log_says_once_when_no_group_has_a_learning_signal(capsys):
    run = grpo.RunControl(total_steps=9)
    record = {"reward": 0.0, "correctness_reward": 0.0, "format_reward": 0.0, "reward_std": 0.0, "kl": 0.0,
              "clip_ratio": 0.0, "completion_length": 9.0, "step_seconds": 1.0, "skipped_updates": 0,
              "truncated_ratio": 0.5}
    for step, flat in enumerate([1, 1, 0.5, 1, 1, 1, 1, 1, 1], start=1):  # a signal at step 3, none after it
        run.end_step({**record, "step": step, "frac_reward_zero_std": flat}, None, None, None, None, None)
    lines = [line for line in capsys.readouterr().out.splitlines() if "NO LEARNING SIGNAL" in line]
    assert len(lines) == 1 and "--sft_steps" in lines[0] and "truncated 50%" in lines[0]


# --- 9. The training loop ------------------------------------------------------------------------------------------


def test_batch_indices_cover_each_pass_once_even_when_a_batch_spans_two_passes():
    # 7 examples, batch 4: step 1 takes the last 3 of pass 1 and the first 1 of pass 2.
    order = sum((grpo.batch_indices(step, 4, 7, seed=5) for step in range(7)), [])  # 28 = 4 passes
    passes = [order[i:i + 7] for i in range(0, 28, 7)]
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # each pass is a fresh permutation
    assert grpo.batch_indices(1, 4, 7, seed=5) == passes[0][4:] + passes[1][:1]  # and a pure function of its arguments


@pytest.mark.parametrize("variant", [
    {},
    {"loss_type": "dapo", "epsilon_high": 0.28},
    {"loss_type": "dr_grpo", "max_completion_length": 8},
    {"importance_sampling_level": "sequence"},
    {"loss_type": "cispo", "epsilon_high": 0.1, "off_policy_mask_threshold": 0.01},  # some capped, one row dropped
    {"loss_type": "sapo", "use_bias_correction_kl": True},
    {"delta": 1.3, "use_bias_correction_kl": True, "off_policy_mask_threshold": 0.01},
], ids=["grpo", "dapo", "dr_grpo", "gspo", "cispo_mask", "sapo_unbiased_kl", "grpo_delta_unbiased_kl_mask"])
def test_micro_batches_give_the_full_batch_gradient(tiny, variant):
    model, tokenizer = tiny
    torch.manual_seed(0)
    input_ids = torch.cat([prompt_ids_for(tokenizer, copies=6), torch.randint(0, 300, (6, 5))], dim=1)  # (6, P + 5)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] + [0] * 4, [1] * 4 + [0], [1] * 5])
    with torch.no_grad():
        ref_log_probs = grpo.compute_log_probs(model, input_ids, attention_mask, 5) - 0.1  # (6, 5)
    batch = (input_ids, attention_mask, completion_mask, torch.randn(6, 1), ref_log_probs)
    initial = copy.deepcopy(model.state_dict())
    full = _two_updates(model, 6, batch, **variant)
    assert torch.count_nonzero(full[1][2]) > 0 and full[1][1] != full[0][1]
    for micro_batch_size in (4, 1):
        model.load_state_dict(initial)
        for (old, loss, grads), (old_full, loss_full, grads_full) in zip(
                _two_updates(model, micro_batch_size, batch, **variant), full):
            assert torch.allclose(old, old_full, atol=1e-6)
            assert loss == pytest.approx(loss_full, abs=1e-6)
            assert torch.allclose(grads, grads_full, atol=1e-6, rtol=1e-5)


def test_a_bf16_reference_model_keeps_the_policys_rotary_positions(tiny):
    model, _ = tiny
    reference = grpo.make_reference_model(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in reference.parameters())
    policy_buffers = dict(model.named_buffers())
    assert any("inv_freq" in name for name in policy_buffers)
    for name, buffer in reference.named_buffers():  # inv_freq in bf16 would shift every position's angle
        assert buffer.dtype == policy_buffers[name].dtype and torch.equal(buffer, policy_buffers[name]), name


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _with_lora(model, add=True):
    """model with adapters on every attention and MLP projection, B made non-zero (as after training)."""
    if add:
        grpo.add_lora(model, 4, 8.0, grpo.LORA_TARGETS.split(","))
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in grpo.lora_layers(model):
            layer.B.weight.copy_(0.1 * torch.randn(layer.B.weight.shape, generator=noise))
    return model


def test_lora_starts_exactly_at_the_base_model_and_its_reference_copies_only_the_adapters(tiny):
    model, tokenizer = tiny
    ids = prompt_ids_for(tokenizer, copies=2)
    base = _logits(model, ids)
    grpo.add_lora(model, 4, 8.0, grpo.LORA_TARGETS.split(","))
    assert len(grpo.lora_layers(model)) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert torch.equal(_logits(model, ids), base)  # B = 0: exactly the base model's outputs
    assert all(layer.A.weight.abs().sum() > 0 for layer in grpo.lora_layers(model))  # A random
    reference = grpo.lora_reference_model(model)
    policy_tensors = {id(p) for p in model.parameters()}
    shared = {name for name, p in reference.named_parameters() if id(p) in policy_tensors}
    assert shared == {name for name, p in model.named_parameters() if not p.requires_grad}  # no weight copied
    assert not any(p.requires_grad for p in reference.parameters())
    assert torch.equal(_logits(reference, ids), base)  # at the start: exactly the loaded model
    _with_lora(model, add=False)  # the policy's adapters move, the reference's copy does not
    assert not torch.allclose(_logits(model, ids), base) and torch.equal(_logits(reference, ids), base)
    assert torch.equal(_logits(grpo.lora_reference_model(model), ids), _logits(model, ids))  # a new one: the policy now


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_reach_the_adapters_and_nothing_else(tiny, checkpointing):
    model, tokenizer = _with_lora(tiny[0]), tiny[1]
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = prompt_ids_for(tokenizer, copies=2)
    grpo.compute_log_probs(model, ids, torch.ones_like(ids), 4).sum().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    adapters = {name for name, p in model.named_parameters() if name.endswith((".A.weight", ".B.weight"))}
    assert trained == adapters and len(adapters) == 28
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name in adapters)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == adapters


def test_lora_trains_only_the_adapters_against_the_policy_at_each_iterations_start(tiny, tiny_dir, monkeypatch):
    model, tokenizer = tiny
    examples = grpo.load_gsm8k(write_jsonl(os.path.join(tiny_dir, "lora.jsonl"), arithmetic_rows(8)))
    grpo.add_lora(model, 4, 8.0, grpo.LORA_TARGETS.split(","))
    frozen = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    ids = prompt_ids_for(tokenizer)
    base, made, make = _logits(model, ids), [], grpo.lora_reference_model
    monkeypatch.setattr(grpo, "make_reference_model", lambda *args: pytest.fail("a full reference copy was made"))

    def record(policy):  # each reference, and the policy's outputs when it was made
        made.append((make(policy), _logits(policy, ids)))
        return made[-1][0]

    monkeypatch.setattr(grpo, "lora_reference_model", record)
    history = _train(model, tokenizer, examples, num_steps=2, num_iterations=2, batch_size=2, learning_rate=1e-2)
    assert history[-1]["kl"] > 0 and len(made) == 2  # one reference per iteration
    assert torch.equal(made[0][1], base) and not torch.equal(made[1][1], base)
    assert all(torch.equal(_logits(reference, ids), then) for reference, then in made)  # frozen since
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def test_merged_lora_is_the_adapted_model_and_loads_with_from_pretrained(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = _with_lora(tiny[0]), tiny[1]
    ids = prompt_ids_for(tokenizer, copies=2)
    adapted = _logits(model, ids)
    grpo.merge_lora(model)
    assert not grpo.lora_layers(model) and all(type(m) is not grpo.LoRALinear for m in model.modules())
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for logits in (_logits(model, ids), _logits(reloaded, ids)):
        assert torch.allclose(logits, adapted, atol=1e-5)  # float32 rounding of W + (alpha / R) B A


def test_lora_weights_held_in_bf16_change_nothing_under_autocast(tiny_dir):
    ids = prompt_ids_for(grpo.load_model_and_tokenizer(tiny_dir, torch.device("cpu"))[1], copies=2)
    outputs = []
    for dtype in (None, torch.bfloat16):
        model = grpo.load_model_and_tokenizer(tiny_dir, torch.device("cpu"))[0]
        torch.manual_seed(0)
        grpo.add_lora(model, 4, 8.0, grpo.LORA_TARGETS.split(","), frozen_dtype=dtype)
        assert {layer.base.weight.dtype for layer in grpo.lora_layers(model)} == {dtype or torch.float32}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the adapters' master
        with torch.autocast("cpu", torch.bfloat16):
            outputs.append(_logits(model, ids))
    assert torch.equal(*outputs)  # autocast rounds a float32 weight to bf16 at each matmul: the same numbers


def test_lora_and_its_adapters_off_run_on_a_dataparallel_replica(tiny, monkeypatch):
    model, tokenizer = tiny
    ids = prompt_ids_for(tokenizer, copies=2)
    score = lambda module: module(ids, torch.ones_like(ids), 4)  # (2, 4) log-probs of the last 4 tokens
    with torch.no_grad():
        base = score(grpo.LogProbModule(model, temperature=1.0))
        grpo.add_lora(model, 4, 8.0, grpo.LORA_TARGETS.split(","))
        reference = grpo.lora_reference_model(model)
        _with_lora(model, add=False)
        for module in (grpo.LogProbModule(model, 1.0), grpo.LogProbModule(reference, 1.0)):
            assert torch.equal(score(_fake_replicate(module, monkeypatch)), score(module))
        assert torch.equal(score(grpo.LogProbModule(reference, 1.0)), base)


def test_the_optimizer_is_fused_on_gpu(tiny):
    model, _ = tiny
    assert grpo.make_optimizer(model, 1e-3, 0.01, torch.device("cuda")).defaults["fused"] is True
    assert not grpo.make_optimizer(model, 1e-3, 0.01, torch.device("cpu")).defaults["fused"]


def _tiny_checkpoint(model, tokenizer, out, reference=True):
    """A checkpoint-2 of the tiny model after one AdamW step, written by save_checkpoint."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    ref = grpo.make_reference_model(model, None) if reference else None
    return grpo.save_checkpoint(str(out), 2, model, tokenizer, optimizer, ref, {"bad_steps": 0}, 2)


def test_a_gpu_checkpoint_resumes_on_a_cpu_only_machine(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    # Save as a GPU run would: every tensor's storage tagged as living on cuda:0.
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    path = _tiny_checkpoint(model, tokenizer, tmp_path)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA"):  # what loading it naively does on this machine
        torch.load(os.path.join(path, "training_state.pt"), weights_only=True)
    state = grpo.load_training_state(path, torch.device("cpu"))
    assert state["step"] == 2 and state["reference"] is not None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(state["optimizer"])
    grpo.restore_rng(state["rng"])


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_the_gpus_there_are(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=0: restored.append(device))
    rng = {"python": grpo.random.getstate(), "torch": torch.get_rng_state(),
           "cuda": [torch.zeros(16, dtype=torch.uint8)] * 3}  # saved on a machine with 3 GPUs
    grpo.restore_rng(rng)
    assert restored == [0]


def test_resume_state_is_let_go_once_used(tiny, tmp_path):
    import gc
    import weakref

    model, tokenizer = tiny
    state = grpo.load_training_state(_tiny_checkpoint(model, tokenizer, tmp_path), torch.device("cpu"))
    reference_weight = weakref.ref(next(iter(state["reference"].values())))
    control = grpo.RunControl(resume=state)
    del state
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, reference = control.start(optimizer, model, None, beta=0.04, total_steps=4)
    gc.collect()
    assert step == 2 and reference is not None
    assert reference_weight() is None  # the checkpoint's copy is gone; the reference model holds its own
    assert control.resume is None


def test_no_reference_model_is_made_when_beta_is_zero(tiny, tiny_dir, monkeypatch):
    model, tokenizer = tiny
    examples = grpo.load_gsm8k(write_jsonl(os.path.join(tiny_dir, "b0.jsonl"), arithmetic_rows(4)))

    def refuse(*args, **kwargs):
        raise AssertionError("a reference model was made with beta == 0")

    monkeypatch.setattr(grpo, "make_reference_model", refuse)
    history = _train(model, tokenizer, examples, beta=0.0)
    assert history[0]["kl"] == 0.0


def test_step_record_reports_zero_std_groups_and_truncation():
    rewards = torch.tensor([2.8, 2.8, 0.0, 0.8])  # G = 2: the first group agrees (no signal), the second not
    record = grpo.step_metrics(["a"] * 4, ["1"] * 4, rewards, torch.tensor([True, False, False, False]),
                               torch.ones(4, 3), torch.ones(4, 5), 2, [{"loss": 0.0, "skipped": False}],
                               {"step": 1.0, "rollout": 0.5, "update": 0.5})
    assert record["frac_reward_zero_std"] == 0.5 and record["truncated_ratio"] == 0.25


def test_masked_truncated_completions_get_no_loss(tiny, tiny_dir, monkeypatch):
    model, tokenizer = tiny
    examples = grpo.load_gsm8k(write_jsonl(os.path.join(tiny_dir, "trunc.jsonl"), arithmetic_rows(4)))
    # Advantages that would move the weights if any token got a loss.
    monkeypatch.setattr(grpo, "compute_group_advantages", lambda rewards, *args: torch.tensor([[1.0], [-1.0]] * 4))
    before = copy.deepcopy(model.state_dict())
    history = _train(model, tokenizer, examples, max_completion_length=2, mask_truncated_completions=True,
                     weight_decay=0.0, beta=0.04)
    assert history[0]["truncated_ratio"] == 1.0  # nothing ended within 2 tokens: every completion is masked
    assert history[0]["loss"] == 0.0
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_eta_comes_from_the_recent_steps_not_the_slow_first_one():
    assert grpo.eta([60.0, 1.0, 1.2, 0.8, 1.0], 100) == "0:01:40"  # not 0:21:20
    assert grpo.eta([2.0] * 20 + [1.0] * 5, 10) == "0:00:10" and grpo.eta([1.0], 99 * 3600 + 3599) == "99:59:59"


def test_the_step_lines_fit_a_120_column_terminal():
    worst = dict(step=500, reward=2.8, correctness_reward=2.0, format_reward=0.8, reward_std=1.234, kl=12.3456,
                 clip_ratio=1.0, completion_length=4000, step_seconds=12345.6, loss=-12.3456, grad_norm=123.456,
                 clip_ratio_low=1.0, clip_ratio_high=1.0, frac_reward_zero_std=1.0, truncated_ratio=1.0,
                 rollout_seconds=9999.9, update_seconds=2345.6)
    assert len(grpo.step_line(worst, 500, "99:59:59")) <= 120
    for shown in ({}, {"off_policy_masked": 1.0}, {"cispo_clip_ratio": 1.0, "off_policy_masked": 1.0}):
        assert len(grpo.details_line({**worst, **shown})) <= 120


def test_the_summary_shows_the_first_and_last_step_and_the_time(capsys):
    record = dict(reward=1.0, correctness_reward=0.5, format_reward=0.5, kl=0.01, step_seconds=2.0,
                  rollout_seconds=1.0, update_seconds=0.5, generation_tokens_per_second=10.0, train_tokens_per_second=5.0)
    grpo.print_run_summary([record], torch.device("cpu"))
    printed = capsys.readouterr().out
    assert "summary: 1 step," in printed and "correct 0.5000 -> 0.5000" in printed
    assert max(map(len, printed.splitlines())) <= 120


def test_format_reward_rises_on_the_tiny_model(tiny, tiny_dir):
    """A toy run: with a large learning rate the random model learns to emit the format tags."""
    model, tokenizer = tiny
    examples = grpo.load_gsm8k(write_jsonl(os.path.join(tiny_dir, "learn.jsonl"), arithmetic_rows(40)))
    history = _train(model, tokenizer, examples, num_steps=30, batch_size=4, num_generations=8,
                     max_completion_length=12, mu=2, beta=0.04, learning_rate=1e-2, max_grad_norm=1.0)
    first = sum(r["format_reward"] for r in history[:5]) / 5
    last = sum(r["format_reward"] for r in history[-5:]) / 5
    # Measured: about 0.03 -> 0.7 (of 0.8) over seeds 0-2.
    assert last > 0.5 and last > first + 0.3, (first, last)


@pytest.mark.slow
def test_main_end_to_end_writes_a_loadable_model_and_metrics(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    held_out = write_jsonl(tmp_path / "test.jsonl", arithmetic_rows(20)[12:])
    out = tmp_path / "run"
    history = grpo.main(["--model_name", tiny_dir, "--dataset", data, "--eval_dataset", held_out, "--eval_size", "4",
                         "--num_steps", "3", "--batch_size", "2", "--num_generations", "3", "--mu", "2",
                         "--max_completion_length", "10", "--micro_batch_size", "2", "--device", "cpu",
                         "--learning_rate", "1e-3", "--output_dir", str(out), "--log_completions_steps", "2",
                         "--sft_steps", "2", "--eval_steps", "1"])
    assert len(history) == 3
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert [line["eval"]["num_examples"] for line in lines] == [4, 4, 4]  # --eval_steps 1
    for key in ("step", "reward", "correctness_reward", "format_reward", "reward_std", "kl", "loss", "clip_ratio",
                "completion_length", "step_seconds", "tokens_per_second"):
        assert all(math.isfinite(line[key]) for line in lines), key
    args = json.loads((out / "args.json").read_text())
    assert args["mu"] == 2 and args["bf16"] is False  # bf16 applies on GPU only: recorded as it applied
    evaluation = json.loads((out / "eval.json").read_text())
    assert list(evaluation) == ["before", "after_cold_start", "step_1", "step_2", "step_3", "after"]
    assert evaluation["after"]["num_examples"] == 4 and evaluation["step_2"] == lines[1]["eval"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    trained = grpo.load_model_and_tokenizer(str(out), torch.device("cpu"))[0]
    assert torch.equal(reloaded.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "--- sample" in printed and "summary:" in printed
    assert "cold start step 2/2" in printed and "accuracy, strict / lenient: before " in printed


# --- 10. Command line: bad input gets a clear error (and engineering D) --------------------------------------------


def test_defaults_follow_the_seed():
    args = grpo.parse_args([])
    assert (args.loss_type, args.scale_rewards, args.epsilon_high, args.importance_sampling_level,
            args.mask_truncated_completions) == ("grpo", "group", None, "token", False)
    assert (args.delta, args.use_bias_correction_kl, args.off_policy_mask_threshold) == (None, False, None)
    assert grpo.parse_args(["--loss_type", "cispo", "--epsilon_high", "0.1"]).epsilon_high == 0.1  # no lower clip
    assert (args.num_iterations, args.num_steps, args.num_generations, args.max_completion_length, args.mu,
            args.epsilon) == (1, 500, 4, 400, 3, 0.2)
    assert (args.model_name, args.dataset, args.batch_size, args.beta, args.learning_rate, args.max_grad_norm,
            args.temperature, args.seed) == ("Qwen/Qwen2.5-1.5B-Instruct", "openai/gsm8k", 7, 0.04, 5e-6, 0.1, 1.0, 42)


@pytest.mark.parametrize("flags, message", [
    (["--num_generations", "1"], "at least 2"),
    (["--learning_rate", "0"], "positive"),
    (["--learning_rate", "-0.5"], "positive"),
    (["--batch_size", "0"], "positive integer"),
    (["--micro_batch_size", "-2"], "positive integer"),
    (["--max_completion_length", "0"], "positive integer"),
    (["--epsilon", "1"], "between 0 and 1"),
    (["--epsilon", "0"], "between 0 and 1"),
    (["--beta", "-0.1"], "0 or more"),
    (["--num_steps", "ten"], "not a valid int"),
    (["--temperature", "nan"], "positive"),
    (["--epsilon_high", "0.1"], "below --epsilon"),
    (["--epsilon_high", "0"], "positive"),
    (["--loss_type", "ppo"], "invalid choice"),
    (["--scale_rewards", "std"], "invalid choice"),
    (["--importance_sampling_level", "word"], "invalid choice"),
    (["--loss_type", "cispo", "--delta", "4"], "--delta has no effect with --loss_type cispo"),
    (["--loss_type", "sapo", "--epsilon_high", "0.28"], "--epsilon_high has no effect with --loss_type sapo"),
    (["--loss_type", "sapo", "--epsilon", "0.3"], "--epsilon has no effect"),
    (["--sapo_temperature_neg", "2"], "--sapo_temperature_neg has no effect with --loss_type grpo"),
    (["--delta", "1.2"], "must be above 1 + epsilon_high = 1.2"),
    (["--delta", "1.25", "--epsilon_high", "0.28"], "must be above 1 + epsilon_high = 1.28"),
    (["--use_bias_correction_kl", "--beta", "0"], "--beta 0 has none"),
    (["--off_policy_mask_threshold", "0"], "positive"),
    (["--loss_type", "cispo"], "caps its weights at 1 + --epsilon_high"),
    (["--eval_steps", "5", "--eval_size", "0"], "give more than 0"),
    (["--lora_alpha", "16"], "--lora_alpha has no effect without --lora_rank"),
])
def test_bad_flag_values_exit_2_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        grpo.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_ends_with_example_commands(capsys):
    with pytest.raises(SystemExit):
        grpo.parse_args(["--help"])
    examples = capsys.readouterr().out.split("examples:")[1]
    assert "--device cpu" in examples and "CUDA_VISIBLE_DEVICES=0 python grpo.py" in examples
    assert examples.count("python grpo.py") >= 3


@pytest.mark.parametrize("name, local", [
    ("openai/gsm8k", False), ("Qwen/Qwen2.5-1.5B-Instruct", False), ("./data", True), ("/abs/x", True),
    ("~/models/q", True), ("train.jsonl", True), ("a/b/c", True), ("gsm8k", True),
])
def test_local_looking_names_are_never_sent_to_the_hub(name, local):
    assert grpo.looks_local(name) == local


def test_a_path_under_an_existing_folder_is_local_even_with_one_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not grpo.looks_local("data/train")
    (tmp_path / "data").mkdir()
    assert grpo.looks_local("data/train")
    with pytest.raises(grpo.DataError, match="data file not found: data/train"):
        grpo.load_gsm8k("data/train")


@pytest.mark.slow
def test_missing_model_directory_is_a_clear_error(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", arithmetic_rows(2))
    out = tmp_path / "out"
    message = _main_error(["--model_name", str(tmp_path / "nope"), "--dataset", data, "--eval_size", "0",
                           "--output_dir", str(out)])
    assert "model directory not found" in message
    assert not out.exists()  # a run that fails to start leaves nothing behind


@pytest.mark.slow
def test_a_bad_model_name_does_not_delete_the_run_to_overwrite(tiny_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12)), tmp_path / "run"
    grpo.main(_run_flags(tiny_dir, data, out, "--num_steps", "1"))
    flags = _run_flags(str(tmp_path / "typo"), data, out, "--overwrite_output_dir")
    assert "model directory not found" in _main_error(flags)
    assert grpo.list_checkpoints(out) and (out / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("content, message", [
    (None, "data file not found"),
    ("", "holds no examples"),
    ("{not json\n", "not valid JSON"),
    ('{"q": "x", "a": "#### 1"}\n', "'question' and 'answer'"),
    ('{"question": "x", "answer": "no delimiter"}\n', "'####'"),
    ("[1, 2]", "list of objects"),
])
def test_bad_data_files_are_clear_errors(tiny_dir, tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    assert message in _main_error(["--model_name", tiny_dir, "--dataset", str(path), "--eval_size", "0"])


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("output_dir_is_a_file", "is a file, not a folder"),
    ("not_utf8", "is not UTF-8 text"),
    ("dataset_is_a_folder", "must be a .json or .jsonl file"),
    ("resume_and_overwrite", "choose one"),
    ("resume_without_a_checkpoint", "--resume_from latest: no checkpoint in"),
    ("unwritable_output_dir", "cannot write to --output_dir"),
    ("model_is_a_file", "is a file: pass the folder that save_pretrained wrote"),
    ("model_folder_is_empty", "holds no saved model (no config.json)"),
    ("lora_targets_match_nothing", "--lora_targets: the model has no linear layer named qkv"),
])
def test_more_bad_input_is_a_clear_one_line_error_that_leaves_nothing_behind(tiny_dir, tmp_path, case, message,
                                                                             monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(4))
    out = tmp_path / "out"
    flags = _run_flags(tiny_dir, data, out, "--num_steps", "1")
    if case == "output_dir_is_a_file":
        out.write_text("not a folder")
    elif case == "not_utf8":
        (tmp_path / "latin1.jsonl").write_bytes('{"question": "caf\xe9", "answer": "#### 1"}\n'.encode("latin-1"))
        flags = _run_flags(tiny_dir, str(tmp_path / "latin1.jsonl"), out)
    elif case == "dataset_is_a_folder":
        flags = _run_flags(tiny_dir, str(tmp_path), out)
    elif case.startswith("resume_"):
        flags += ["--resume_from", "latest"]
        if case == "resume_and_overwrite":
            flags.append("--overwrite_output_dir")
    elif case.startswith("model_"):
        flags = _run_flags(str(tmp_path / "model"), data, out)
        if case.endswith("empty"):
            (tmp_path / "model").mkdir()
        else:
            (tmp_path / "model").write_text("weights")
    elif case == "lora_targets_match_nothing":
        flags += ["--lora_rank", "2", "--lora_targets", "q_proj, qkv"]
    elif case == "unwritable_output_dir":
        monkeypatch.setattr(grpo, "write_file", lambda *args: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    if case == "resume_and_overwrite":
        with pytest.raises(SystemExit) as exit_info:
            grpo.main(flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    else:
        assert message in _main_error(flags)
    assert case in ("output_dir_is_a_file", "unwritable_output_dir") or not out.exists()


def test_json_files_are_replaced_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "eval.json")
    grpo.write_file(path, '{"before": 1}')
    with pytest.raises(UnicodeEncodeError):
        grpo.write_file(path, '{"after": "\ud800"}')  # fails half-way through writing
    assert json.loads(open(path).read()) == {"before": 1}


def test_resume_drops_a_metrics_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "rew')
    grpo.keep_metrics_up_to(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


GOOD_ROW = json.dumps({"question": "How many?", "answer": "#### 3"})


@pytest.mark.parametrize("lines, where", [
    ([GOOD_ROW] * 22 + ['{"question": "q", "answer": '] + [GOOD_ROW] * 5, "line 23 column 29"),
    ([GOOD_ROW] * 3 + ['{"question"'], "line 4 column 12"),
    ([GOOD_ROW, GOOD_ROW + ",", GOOD_ROW], "line 2 column 46"),
], ids=["middle", "last_line", "trailing_comma"])
def test_a_broken_jsonl_line_is_reported_at_its_own_line_and_column(tmp_path, lines, where):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(grpo.DataError, match=where):
        grpo.load_gsm8k(str(tmp_path / "d.jsonl"))


def test_a_bare_name_that_is_no_file_says_how_hub_data_sets_are_named():
    with pytest.raises(grpo.DataError, match="owner/name, e.g. openai/gsm8k"):
        grpo.load_gsm8k("gsm8k")


def test_rows_without_an_answer_are_skipped_and_counted(tmp_path, capsys):
    rows = arithmetic_rows(3) + [{"question": "q", "answer": "no delimiter"}]
    examples = grpo.load_gsm8k(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(examples) == 3 and examples[0]["answer"] == "5"
    assert "skipped 1 of 4 rows" in capsys.readouterr().out


def test_json_list_files_thousands_commas_and_a_byte_order_mark_load(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": "How many?", "answer": "10 x 108 = 1080\n#### 1,080"}]))
    assert grpo.load_gsm8k(str(path)) == [{"question": "How many?", "answer": "1,080", "solution": "10 x 108 = 1080"}]
    (tmp_path / "bom.jsonl").write_text(GOOD_ROW + "\n", encoding="utf-8-sig")
    assert grpo.load_gsm8k(str(tmp_path / "bom.jsonl")) == [{"question": "How many?", "answer": "3", "solution": ""}]


@pytest.mark.slow
def test_unreachable_hub_data_or_model_is_a_clear_error_whose_advice_names_only_what_is_missing(tiny_dir, capsys):
    message = _main_error(["--model_name", tiny_dir, "--dataset", "no-such-user/no-such-data", "--eval_size", "0"])
    assert "could not load data set" in message and "--dataset FILE.jsonl" in message  # what to do about it
    assert "--model_name" not in message and "HF_HUB_OFFLINE" not in message  # the tests set HF_HUB_OFFLINE=1
    data = write_jsonl(os.path.join(tiny_dir, "local.jsonl"), arithmetic_rows(2))
    message = _main_error(["--dataset", data, "--eval_size", "0", "--output_dir", os.path.join(tiny_dir, "never")])
    assert "could not load model" in message and "--model_name DIR" in message and "--dataset" not in message
    assert "no GPU: the default run" in capsys.readouterr().out  # said before the model is even looked for


@pytest.mark.slow
def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "grpo.py"), "--model_name", str(tmp_path / "missing"),
                             "--dataset", str(tmp_path / "missing.jsonl")], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: data file not found: {tmp_path / 'missing.jsonl'}"


def grpo_layout():
    """(first line, last line, title) of each banner-delimited section of grpo.py."""
    lines = open(os.path.join(HERE, "grpo.py"), encoding="utf-8").read().splitlines()
    starts, i = [], 0
    while i < len(lines):
        if lines[i].startswith("# ====="):
            starts.append((i + 1, lines[i + 1][2:]))
            i += 1
            while not lines[i].startswith("# ====="):  # the banner's closing rule
                i += 1
        i += 1
    ends = [start - 1 for start, _ in starts[1:]] + [len(lines)]
    return [(start, end, title) for (start, title), end in zip(starts, ends)]


def test_the_readme_layout_table_matches_the_file():
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    layout = grpo_layout()
    # The lesson (1-9) in one piece, then the fences, then the command line.
    assert [title.split()[0] if title[0].isdigit() else title[:13] for _, _, title in layout] == [
        "1.", "2.", "3.", "4.", "5.", "6.", "7.", "8.", "9.", "Engineering A", "Engineering B", "Engineering C",
        "Engineering D", "10."]
    for start, end, title in layout:
        assert f"| {start}-{end} | {title} |" in readme, (start, end, title)
    source = open(os.path.join(HERE, "grpo.py"), encoding="utf-8").read()
    assert source.count("\n# (engineering after the lesson; read it when you need it)\n") == 4


# --- A toy task on which the answers get right: the correctness reward at work -------------------------------------
# "Amy counts cards in boxes: 0 7 0 0 0 0 0. Which count is most common?" -> 0. Seven digits, six of
# them the answer, shuffled; answers balanced over 0-9, so chance is 1/10. Training and held-out rows
# use different (name, object) pairs and different digit lists: every held-out question is new.
# A tiny model is warm-started on the FORMAT only, "<reasoning>count</reasoning><answer>D</answer>"
# with D drawn at random for every example at every step: it learns how to answer and that the answer
# is a digit, not which digit (its greedy answer is about the same digit for every question: chance).
# GRPO's correctness reward is then the only source of the mapping. What it took (measured): Qwen2's
# 0.02 init leaves even supervised training at chance for hundreds of steps (0.1 is used); one layer
# with 8 heads learns sooner than two with 4; beta 0.2 keeps the answers from collapsing onto one or
# two digits, after which groups of a different answer hold no right completion (beta 0: 0.57 / 0.20
# / 0.51 on seeds 0-2; beta 0.04: 0.85 / 0.97 / 0.99; beta 0.2: 1.00 on seeds 0-9).

TOY_NAMES = ["Tom", "Ann", "Sam", "Kim", "Bob", "Eve", "Max", "Amy"]
TOY_OBJECTS = ["apples", "pens", "cards", "eggs", "books", "cups"]
DIGITS = [str(d) for d in range(10)]
TOY_GRPO = dict(num_steps=150, batch_size=8, num_generations=8, max_completion_length=8, mu=2, beta=0.2,
                epsilon=0.2, learning_rate=2e-3, weight_decay=0.0, max_grad_norm=1.0, temperature=1.0,
                micro_batch_size=64)


def toy_question(name, thing, digits):
    return f"{name} counts {thing} in boxes: {' '.join(digits)}. Which count is most common?"


def toy_rows(pairs, rng, exclude=frozenset(), per_pair=10, length=7, majority=6):
    """GSM8K-format rows: per_pair for each (name, object), answers cycling through 0-9; a digit list
    is `majority` copies of the answer and other distinct digits, shuffled, never one in `exclude`."""
    rows = []
    for name, thing in pairs:
        for k in range(per_pair):
            answer = DIGITS[k % 10]
            while True:
                digits = [answer] * majority + rng.sample([d for d in DIGITS if d != answer], length - majority)
                rng.shuffle(digits)
                if " ".join(digits) not in exclude:
                    break
            rows.append({"question": toy_question(name, thing, digits),
                         "answer": f"{' '.join(digits)}: {answer} comes {majority} times.\n#### {answer}"})
    return rows


def toy_split(seed):
    """380 training and 100 held-out examples (load_gsm8k's form), disjoint in pairs and digit lists."""
    rng = random.Random(seed)
    pairs = [(n, o) for n in TOY_NAMES for o in TOY_OBJECTS]
    rng.shuffle(pairs)
    train = toy_rows(pairs[10:], rng)
    held_out = toy_rows(pairs[:10], rng, exclude=frozenset(row["answer"].split(":")[0] for row in train))
    as_examples = lambda rows: [{"question": r["question"], "answer": grpo.extract_answer_from_dataset(r["answer"])}
                                for r in rows]
    return as_examples(train), as_examples(held_out)


def build_toy_model(seed):
    """A byte-level BPE tokenizer over the task's words (no digits: a digit is one token in the
    question and in the answer) and a 1-layer, 64-wide Qwen2 chat model (initializer_range 0.1)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    corpus = [grpo.SYSTEM_PROMPT, " ".join(TOY_NAMES), " ".join(TOY_OBJECTS), "count system user assistant"]
    tokenizer = build_tokenizer((corpus + [toy_question(n, o, ["X"]) for n in TOY_NAMES for o in TOY_OBJECTS]) * 4,
                                vocab_size=400)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.1, bos_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
                                               pad_token_id=tokenizer.pad_token_id, do_sample=True)
    return model, tokenizer


def warm_start_on_the_format(model, tokenizer, examples, seed, steps=150, batch_size=32, learning_rate=3e-3):
    """Supervised steps on prompt -> "<reasoning>count</reasoning><answer>D</answer><|im_end|>", the
    loss on the completion only, D uniformly random each time: the format, not the answer."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    prompts = [tokenizer(grpo.build_prompt(tokenizer, ex["question"]), add_special_tokens=False)["input_ids"]
               for ex in examples]
    completions = {d: tokenizer(f"<reasoning>count</reasoning><answer>{d}</answer>", add_special_tokens=False)
                   ["input_ids"] + [tokenizer.eos_token_id] for d in DIGITS}
    model.train()
    for _ in range(steps):
        rows = [(prompts[i], completions[rng.choice(DIGITS)]) for i in rng.sample(range(len(examples)), batch_size)]
        width = max(len(p) + len(c) for p, c in rows)
        pad = lambda ids, value: ids + [value] * (width - len(ids))
        input_ids = torch.tensor([pad(p + c, tokenizer.pad_token_id) for p, c in rows])  # (b, L)
        labels = torch.tensor([pad([-100] * len(p) + c, -100) for p, c in rows])  # (b, L)
        attention_mask = torch.tensor([pad([1] * (len(p) + len(c)), 0) for p, c in rows])  # (b, L)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (b, L, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_toy(seed=0, lora_rank=0, lora_alpha=32.0, **grpo_overrides):
    """Build, warm-start, evaluate on the held-out questions, train with GRPO (lora_rank > 0: LoRA adapters on the
    warm-started weights), evaluate again."""
    train, held_out = toy_split(seed)
    assert not {ex["question"] for ex in train} & {ex["question"] for ex in held_out}
    model, tokenizer = build_toy_model(seed)
    warm_start_on_the_format(model, tokenizer, train, seed)
    if lora_rank:
        grpo.add_lora(model, lora_rank, lora_alpha, grpo.LORA_TARGETS.split(","))
    evaluate = lambda: grpo.evaluate_model(model, tokenizer, held_out, max_new_tokens=8, batch_size=100)
    before = evaluate()
    torch.manual_seed(seed)
    history = grpo.train_with_grpo(model, tokenizer, train, **{**TOY_GRPO, "seed": seed, **grpo_overrides})
    return {"before": before, "after": evaluate(), "history": history}


TOY_VARIANTS = {
    "grpo": {},
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "none"},
    "dapo": {"loss_type": "dapo", "epsilon_high": 0.28, "mask_truncated_completions": True},
    "gspo": {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
    "cispo": {"loss_type": "cispo", "epsilon_high": 4.0},  # the cap 5: ScaleRL's, TRL's recommended epsilon_high 5.0
    "sapo": {"loss_type": "sapo"},
}


def print_toy_comparison(seeds=(0, 1, 2), num_steps=150):
    """The GRPO variants on the toy task: held-out accuracy, the first step at which the training
    correctness (mean of 5 steps) reaches half of its maximum, and the mean completion length."""
    import contextlib
    import io
    import statistics

    for name, variant in TOY_VARIANTS.items():
        results = []
        for seed in seeds:
            with contextlib.redirect_stdout(io.StringIO()):
                result = run_toy(seed, num_steps=num_steps, **variant)
            correct = [r["correctness_reward"] / 2.0 for r in result["history"]]
            smoothed = [sum(correct[max(0, i - 4):i + 1]) / len(correct[max(0, i - 4):i + 1]) for i in range(len(correct))]
            reached = next((i + 1 for i, c in enumerate(smoothed) if c >= 0.5), None)
            length = statistics.mean(r["completion_length"] for r in result["history"])
            results.append((result["before"]["strict_accuracy"], result["after"]["strict_accuracy"], reached, length))
            print(f"{name:8s} seed {seed}: held-out {results[-1][0]:.2f} -> {results[-1][1]:.2f}, "
                  f"training correctness >= 0.5 at step {reached}, mean length {length:.1f}", flush=True)
        after = [r[1] for r in results]
        print(f"{name:8s} median after {statistics.median(after):.2f} (min {min(after):.2f}, max {max(after):.2f})",
              flush=True)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [{}, {"lora_rank": 8, "learning_rate": 3e-3}], ids=["full", "lora"])
def test_correctness_rises_from_chance_on_held_out_toy_questions(lora):
    result = run_toy(seed=0, **lora)
    # Measured (seeds 0-9): before 0.04-0.10, after 1.00, about 25 s each. LoRA, rank 8 and alpha 32 (scale 4), the
    # adapters alone trained (seeds 0-2): after 0.97-1.00 at lr 3e-3 and 5e-3, 0.69-1.00 at 2e-3; 1e-2 collapses.
    assert result["before"]["strict_accuracy"] <= 0.25
    assert result["after"]["strict_accuracy"] >= 0.6
    assert result["history"][-1]["correctness_reward"] > result["history"][0]["correctness_reward"] + 0.5


# --- Every function of the lesson can be copied out (with what its docstring names) --------------------------------


def test_every_lesson_function_runs_when_copied_with_exactly_what_its_docstring_names(tiny):
    model, tokenizer = tiny
    model.eval()
    torch.manual_seed(0)
    ids = torch.cat([prompt_ids_for(tokenizer, copies=4), torch.randint(0, 300, (4, 3))], dim=1)  # (4, P + 3)
    mask, prompt = torch.ones_like(ids), prompt_ids_for(tokenizer, copies=2)
    logits, tokens = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    log_probs, completion_mask, advantages = torch.randn(4, 3), torch.tensor([[1, 1, 0]] * 4), torch.randn(4, 1)
    eos, prompts = grpo.end_of_sequence_ids(model, tokenizer), [grpo.build_prompt(tokenizer, "2+2?")]
    rollout = dict(max_new_tokens=4, temperature=1.0, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id)
    update = {"loss": 0.5, "kl": 0.1, "clip_ratio": 0.0, "grad_norm": 1.0, "skipped": False}
    calls = {  # name: (args, keywords)
        "build_prompt": ((tokenizer, "What is 2+2?"), {}),
        "extract_answer_from_model_output": (("<answer> 4 </answer>",), {}),
        "extract_answer_from_dataset": (("2+2\n#### 4",), {}),
        "numbers_in": (("$1,080 and 3",), {}),
        "extract_single_number": (("$1,080",), {}),
        "extract_last_number": (("3 then 4",), {}),
        "correctness_reward": ((["<answer>$72</answer>", "<answer>72</answer>"], ["72", "72"]), {}),
        "format_reward": ((["<reasoning></reasoning><answer>"],), {}),
        "combined_reward": ((["<reasoning>r</reasoning><answer>72</answer>"], ["72"]), {}),
        "compute_group_advantages": ((torch.tensor([1.0, 2.0, 3.0, 3.0]), 2), {}),
        "selective_log_softmax": ((logits, tokens), {}),
        "compute_log_probs": ((model, ids, mask, 3, 0.7), {}),
        "create_completion_mask": ((torch.tensor([[5, 9, 5]]), [9]), {}),
        "truncated_completions": ((torch.tensor([[5, 9, 5], [5, 5, 5]]), [9]), {}),
        "masked_sequence_mean": ((log_probs, completion_mask), {}),
        "reduce_per_token": ((log_probs, completion_mask, "dr_grpo", 5), {}),
        "grpo_loss": ((log_probs, log_probs - 0.1, log_probs + 0.1, advantages, completion_mask, 0.04, 0.2), {}),
        "sample_sequences": ((model, prompt, torch.ones_like(prompt)), rollout),
        "end_of_sequence_ids": ((model, tokenizer), {}),
        "generate_completions": ((model, tokenizer, prompts, 2, 4, 1.0, eos), {}),
        "decode_completions": ((tokenizer, torch.tensor([[40, 41, eos[0], 42]]), torch.tensor([[1, 1, 1, 0]])), {}),
        "evaluate_model": ((model, tokenizer, [{"question": "2+2?", "answer": "4"}] * 3),
                           {"max_new_tokens": 4, "batch_size": 2}),
        "sft_completion": (("2 + 2 = <<2+2=4>>4", "4"), {}),
        "sft_loss": ((model, tokenizer, prompts * 2, ["<answer>4</answer>", "4"]), {}),
        "cold_start": ((model, tokenizer, [{"question": "2+2?", "answer": "4", "solution": "2+2=4"}] * 3),
                       {"steps": 2, "batch_size": 2, "learning_rate": 1e-3, "seed": 0}),
        "batch_indices": ((3, 4, 7, 0), {}),
        "make_reference_model": ((model, torch.bfloat16), {}),
        "make_optimizer": ((model, 1e-3, 0.01, torch.device("cpu")), {}),
        "micro_batches": ((5, 2), {}),
        "accumulate_grpo_gradients": ((grpo.LogProbModule(model, 1.0), ids, mask, completion_mask, advantages, None,
                                       None, 2, 0.0, 0.2), {}),
        "step_metrics": ((["<answer>4</answer>", "5"], ["4", "4"], torch.tensor([2.0, 0.0]),
                          torch.tensor([False, True]), completion_mask[:2], mask[:2], 2, [update],
                          {"step": 2.0, "rollout": 1.0, "update": 1.0}), {}),
    }
    sections = [(start, end) for start, end, title in grpo_layout() if title.split(".")[0] in set("123456789")]
    lesson = {node.name for node in ast.parse(open(os.path.join(HERE, "grpo.py")).read()).body
              if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and any(s <= node.lineno <= e for s, e in sections)}
    assert lesson - {"train_with_grpo"} == set(calls)  # every function of sections 1-9 but the loop itself
    for name, (args, keywords) in calls.items():
        results = []
        for function in (copied(name), getattr(grpo, name)):
            torch.manual_seed(0)  # the rollouts sample
            results.append(function(*[copy.deepcopy(a) if isinstance(a, torch.nn.Module) else a for a in args],
                                    **keywords))  # a fresh model for each: cold_start trains it
        untimed = [{k: v for k, v in r.items() if k != "seconds"} if isinstance(r, dict) else r for r in results]
        assert same(*untimed), name


# --- Engineering C: checkpoints, resume, interruption, non-finite updates ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4", "--lora_alpha", "8", "--sft_steps", "2"]],
                         ids=["full", "lora_cold_start"])  # the cold start moves B off 0 before the stop
def test_resume_gives_the_same_result_as_never_stopping(tiny_dir, tmp_path, monkeypatch, lora, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    grpo.main(_run_flags(tiny_dir, data, tmp_path / "straight", *lora))
    trained = "4,096 trained in LoRA adapters of rank 4" if lora else "29,504 trained"  # the parameter line
    assert f"parameters, {trained}) on cpu" in capsys.readouterr().out

    # The same run, stopped by SIGINT during step 2 (rollouts decode once per step), then resumed.
    _signal_on_call(monkeypatch, "decode_completions", 2, signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(_run_flags(tiny_dir, data, tmp_path / "resumed", *lora))
    assert exit_info.value.code == 130
    assert [os.path.basename(p) for p in grpo.list_checkpoints(tmp_path / "resumed")] == ["checkpoint-2"]
    assert [m["step"] for m in _metrics(tmp_path / "resumed")] == [1, 2]
    saved = set(os.listdir(tmp_path / "resumed" / "checkpoint-2"))  # LoRA: the adapters, not the weights
    assert {"training_state.pt", "reference_model.pt"} <= saved  # LoRA's reference: its adapters
    assert ("adapters.pt" in saved, "model.safetensors" in saved) == ((True, False) if lora else (False, True))
    monkeypatch.undo()
    grpo.main(_run_flags(tiny_dir, data, tmp_path / "resumed", *lora, "--resume_from", "latest"))

    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")
    assert torch.allclose(_weights(tmp_path / "resumed"), _weights(tmp_path / "straight"), atol=1e-6)


@pytest.mark.slow
def test_a_run_stopped_during_or_after_its_cold_start_carries_on_exactly(tiny_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    flags = lambda out, *extra: _run_flags(tiny_dir, data, tmp_path / out, "--sft_steps", "2", *extra)
    grpo.main(flags("straight"))
    for function, call, checkpoints in (("sft_loss", 2, []), ("decode_completions", 2, ["checkpoint-2"])):
        _signal_on_call(monkeypatch, function, call, signal.SIGINT)  # during the cold start, then GRPO's step 2
        with pytest.raises(SystemExit):
            grpo.main(flags("again"))  # the first time nothing is saved: the same command starts again
        assert [os.path.basename(p) for p in grpo.list_checkpoints(tmp_path / "again")] == checkpoints
        monkeypatch.undo()
    grpo.main(flags("again", "--resume_from", "latest"))
    assert _metrics(tmp_path / "again") == _metrics(tmp_path / "straight")
    assert torch.allclose(_weights(tmp_path / "again"), _weights(tmp_path / "straight"), atol=1e-6)


@pytest.mark.slow
def test_checkpoints_are_complete_and_pruned(tiny_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12)), tmp_path / "run"
    grpo.main(_run_flags(tiny_dir, data, out, "--save_steps", "1", "--save_total_limit", "2"))
    assert sorted(os.listdir(out / "checkpoint-4")) == sorted(os.listdir(out / "checkpoint-3"))
    assert [os.path.basename(p) for p in grpo.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    files = set(os.listdir(out / "checkpoint-4"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_state.pt", "reference_model.pt"} <= files
    state = grpo.load_training_state(str(out / "checkpoint-4"))
    assert state["step"] == 4 and state["optimizer"]["state"] and state["reference"] is not None
    assert torch.equal(_weights(out / "checkpoint-4"), _weights(out))  # the last checkpoint is the final model
    (out / "checkpoint-6.tmp").mkdir()  # what a crash during a save leaves behind: never resumed
    assert os.path.basename(grpo.list_checkpoints(out)[-1]) == "checkpoint-4"


@pytest.mark.slow
def test_an_output_dir_holding_a_run_is_not_overwritten(tiny_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12)), tmp_path / "run"
    grpo.main(_run_flags(tiny_dir, data, out))
    before = (out / "metrics.jsonl").read_text()
    message = _main_error(_run_flags(tiny_dir, data, out))
    assert "already holds a run" in message and "--resume_from latest" in message
    assert (out / "metrics.jsonl").read_text() == before
    grpo.main(_run_flags(tiny_dir, data, out, "--overwrite_output_dir", "--num_steps", "2"))
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert [os.path.basename(p) for p in grpo.list_checkpoints(out)] == ["checkpoint-2"]


@pytest.mark.slow
def test_a_folder_without_a_checkpoint_or_model_is_started_again(tiny_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12)), tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")  # what an attempt stopped before its first checkpoint leaves
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 9.0}) + "\n")
    grpo.main(_run_flags(tiny_dir, data, out, "--num_steps", "2"))
    assert [m["step"] for m in _metrics(out)] == [1, 2] and _metrics(out)[0]["reward"] != 9.0


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_extending_it_is_recorded(tiny_dir, tmp_path, capsys):
    data, out = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12)), tmp_path / "run"
    grpo.main(_run_flags(tiny_dir, data, out, "--num_steps", "2"))
    assert grpo.main(_run_flags(tiny_dir, data, out, "--num_steps", "2", "--resume_from", "latest")) == []
    printed = capsys.readouterr().out
    assert "at step 2/2: this run is finished; a larger --num_steps" in printed
    history = grpo.main(_run_flags(tiny_dir, data, out, "--num_steps", "3", "--resume_from", "latest"))
    assert [r["step"] for r in history] == [3] and [m["step"] for m in _metrics(out)] == [1, 2, 3]
    assert json.loads((out / "args.json").read_text())["num_steps"] == 3
    assert "changed since the last start: --num_steps 2 -> 3" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_applies_the_changeable_flags_and_refuses_to_change_the_run(tiny_dir, tmp_path, capsys):
    import shutil

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    held_out = ["--eval_dataset", write_jsonl(tmp_path / "test.jsonl", arithmetic_rows(20)[12:]), "--eval_size"]
    grpo.main(_run_flags(tiny_dir, data, tmp_path / "run", "--num_steps", "1", *held_out, "4"))
    for out, lr, size in (("slow", "1e-9", "2"), ("same", "1e-2", "4")):  # the first run's lr was 1e-2
        shutil.copytree(tmp_path / "run", tmp_path / out)
        grpo.main(_run_flags(tiny_dir, data, tmp_path / out, "--num_steps", "2", "--learning_rate", lr, *held_out, size,
                             "--resume_from", "latest"))
    start = _weights(tmp_path / "run")
    assert (_weights(tmp_path / "slow") - start).abs().max() < 1e-6 < (_weights(tmp_path / "same") - start).abs().max()
    assert "before 0.0% / 0.0% (of 4 questions) -> after 0.0% / 0.0% (of 2 questions)" in capsys.readouterr().out
    message = _main_error(_run_flags(str(tmp_path / "other"), data, tmp_path / "run", "--resume_from", "latest"))
    assert f"--model_name {tiny_dir} -> {tmp_path / 'other'}" in message and "start a new run" in message


@pytest.mark.slow
def test_a_signal_while_a_checkpoint_is_written_stops_once_it_is_complete(tiny_dir, tmp_path, monkeypatch, capsys):
    data, out, save = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12)), tmp_path / "run", torch.save

    def save_during_a_signal(value, path, *args, **kwargs):
        if str(path).endswith(os.path.join("checkpoint-2.tmp", "training_state.pt")):  # the checkpoint is half written
            signal.raise_signal(signal.SIGINT)
        return save(value, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_during_a_signal)
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(_run_flags(tiny_dir, data, out, "--save_steps", "2"))
    assert exit_info.value.code == 130 and len(_metrics(out)) == 2  # no step after it
    assert [os.path.basename(p) for p in grpo.list_checkpoints(out)] == ["checkpoint-2"]
    assert f"checkpoint saved in {out / 'checkpoint-2'}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_signal_while_the_final_model_is_saved_says_so_and_stops_before_the_evaluation(tiny_dir, tmp_path,
                                                                                         monkeypatch, capfd):
    from transformers import PreTrainedModel

    data, out = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12)), tmp_path / "run"
    save = PreTrainedModel.save_pretrained

    def save_during_a_signal(model, path, *args, **kwargs):
        if str(path) == str(out):  # the final model, not a checkpoint
            signal.raise_signal(signal.SIGTERM)
        return save(model, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_during_a_signal)
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(_run_flags(tiny_dir, data, out, "--eval_dataset", data, "--eval_size", "2"))
    printed = capfd.readouterr()
    assert exit_info.value.code == 143 and (out / "config.json").is_file() and "eval after" not in printed.out
    assert f"stopping once the final model in {out} is written" in printed.out
    assert f"stopped by SIGTERM once the final model was saved in {out}" in printed.err


@pytest.mark.slow
def test_a_non_finite_update_is_skipped_and_logged(tiny_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    _nan_advantages_on_steps(monkeypatch, bad_steps={2})
    history = grpo.main(_run_flags(tiny_dir, data, tmp_path / "run"))
    assert [r["skipped_updates"] for r in history] == [0, 2, 0, 0]
    assert [m["loss"] is None for m in _metrics(tmp_path / "run")] == [False, True, False, False]
    assert "SKIPPED 2/2 non-finite updates" in capsys.readouterr().out
    assert torch.isfinite(_weights(tmp_path / "run")).all()


@pytest.mark.slow
def test_repeated_non_finite_updates_stop_with_a_checkpoint(tiny_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    _nan_advantages_on_steps(monkeypatch, bad_steps={1, 2, 3, 4})
    message = _main_error(_run_flags(tiny_dir, data, tmp_path / "run", "--max_bad_steps", "3"))
    assert "3 steps in a row had a non-finite loss" in message and "--resume_from latest" in message
    assert [os.path.basename(p) for p in grpo.list_checkpoints(tmp_path / "run")] == ["checkpoint-3"]
    assert torch.equal(_weights(tmp_path / "run" / "checkpoint-3"), _weights(tiny_dir))  # no update was applied


@pytest.mark.slow
def test_a_signal_before_training_starts_stops_without_a_step(tiny_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    held_out = write_jsonl(tmp_path / "test.jsonl", arithmetic_rows(16)[12:])
    _signal_on_call(monkeypatch, "decode_completions", 1, signal.SIGTERM)  # during the "before" evaluation
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(_run_flags(tiny_dir, data, tmp_path / "run", "--eval_dataset", held_out, "--eval_size", "2"))
    assert exit_info.value.code == 143
    assert "before step 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not grpo.list_checkpoints(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before_training", "final_evaluation"])
def test_a_signal_during_evaluation_stops_it_at_once_and_the_advice_works(tiny_dir, tmp_path, moment):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    held_out = write_jsonl(tmp_path / "test.jsonl", arithmetic_rows(300))
    out = tmp_path / "run"
    flags = _run_flags(tiny_dir, data, out, "--num_steps", "1", "--eval_dataset", held_out, "--eval_size", "300",
                       "--eval_batch_size", "1")
    marker = "eval before:" if moment == "before_training" else "eval after:"
    code, stdout, stderr, seconds = _interrupt(flags, (marker, signal.SIGINT))
    assert code == 130, stderr
    finished_evaluations = 0 if moment == "before_training" else 1
    assert stdout.count("300/300") == finished_evaluations and seconds < 10  # at once, not after 300 questions
    assert stdout.endswith("\n")  # the progress line ended before the message
    if moment == "before_training":
        assert "before step 1" in stderr and not grpo.list_checkpoints(out)
    else:
        assert "the trained model is saved" in stderr and (out / "config.json").is_file()
    grpo.main(_advised(flags, stderr))  # the command it printed works
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation) == {"before", "after"} and evaluation["after"]["num_examples"] == 300


@pytest.mark.slow
def test_the_advice_after_a_signal_works_for_a_run_started_with_overwrite(tiny_dir, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12))
    flags = _run_flags(tiny_dir, data, tmp_path / "run", "--overwrite_output_dir")
    _signal_on_call(monkeypatch, "decode_completions", 2, signal.SIGINT)
    with pytest.raises(SystemExit):
        grpo.main(flags)
    monkeypatch.undo()
    advised = _advised(flags, capsys.readouterr().err)
    assert "--overwrite_output_dir" not in advised  # both flags together are refused (exit 2)
    assert [r["step"] for r in grpo.main(advised)] == [3, 4]


@pytest.mark.slow
def test_a_second_signal_quits_at_once_and_the_advice_works(tiny_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12)), tmp_path / "run"
    settings = ["--batch_size", "4", "--num_generations", "16", "--max_completion_length", "48", "--save_steps", "2"]
    flags = _run_flags(tiny_dir, data, out, "--num_steps", "100000", *settings)
    # The first Ctrl-C as step 4 begins, the second as soon as grpo.py says it will finish that step.
    code, _, stderr, _ = _interrupt(flags, ("step 3/", signal.SIGINT), ("finishing this step", signal.SIGINT))
    assert code == 130 and "quit without saving" in stderr, stderr
    assert [os.path.basename(p) for p in grpo.list_checkpoints(out)] == ["checkpoint-2"]
    assert _advised(flags, stderr) == flags + ["--resume_from", "latest"]
    grpo.main(_run_flags(tiny_dir, data, out, "--num_steps", "4", *settings, "--resume_from", "latest"))  # 4, not 100000
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_exits(tiny_dir, tmp_path, signum, code):
    data, out = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(12)), tmp_path / "run"
    flags = _run_flags(tiny_dir, data, out, "--num_steps", "100000")
    returncode, _, stderr, _ = _interrupt(flags, ("step 1/", signum))  # once training runs
    assert returncode == code, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "--resume_from latest" in stderr
    checkpoints = grpo.list_checkpoints(out)
    assert len(checkpoints) == 1 and grpo.load_training_state(checkpoints[0])["step"] == len(_metrics(out)) >= 1


# --- Several processes: torchrun (gloo on CPU), DistributedDataParallel --------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _ddp_flags(tiny_dir, data, out, *extra):
    """A run with a learning signal (the format tags): with near-zero gradients AdamW would turn
    float rounding into lr-sized differences between any two ways of summing the same gradient."""
    return ["--model_name", tiny_dir, "--dataset", data, "--eval_size", "0", "--num_steps", "3", "--batch_size", "4",
            "--num_generations", "8", "--mu", "2", "--max_completion_length", "12", "--micro_batch_size", "4",
            "--device", "cpu", "--learning_rate", "1e-3", "--max_grad_norm", "1.0", "--output_dir", str(out),
            "--log_completions_steps", "0", *extra]


def _torchrun(flags, timeout=180):
    return subprocess.run([*TORCHRUN, os.path.join(HERE, "grpo.py"), *flags], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], ["--loss_type", "dapo", "--scale_rewards", "batch", "--epsilon_high", "0.28"],
                                     ["--loss_type", "cispo", "--epsilon_high", "0.1", "--use_bias_correction_kl",
                                      "--off_policy_mask_threshold", "0.02"], ["--lora_rank", "4", "--sft_steps", "1"]],
                         ids=["grpo", "dapo_batch_scaled", "cispo_unbiased_kl_mask", "lora_cold_start"])
def test_torchrun_gives_the_rewards_and_weights_of_one_process_and_one_set_of_outputs(tiny_dir, tmp_path, variant):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40))
    held_out = write_jsonl(tmp_path / "test.jsonl", arithmetic_rows(45)[40:])
    evaluation = ["--eval_dataset", held_out, "--eval_size", "5"]  # 5 questions: 3 on one process, 2 on the other
    grpo.main(_ddp_flags(tiny_dir, data, tmp_path / "one", *evaluation, *variant))
    result = _torchrun(_ddp_flags(tiny_dir, data, tmp_path / "two", *evaluation, *variant))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["reward"] for m in two] == [m["reward"] for m in one]  # the same completions, step by step
    if "cispo" in variant:  # its diagnostics reach metrics.jsonl, and the cap and the mask acted
        assert one[0]["cispo_clip_ratio"] > 0 and one[0]["off_policy_masked"] > 0
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert torch.allclose(_weights(tmp_path / "two"), _weights(tmp_path / "one"), atol=1e-5)
    # One set of outputs: each step printed once, one metrics line per step, the evaluation of all 5.
    assert [result.stdout.count(f"step {k}/3 ") for k in (1, 2, 3)] == [1, 1, 1]
    def scores(run):
        return {when: {k: v for k, v in result.items() if k != "seconds"}
                for when, result in json.loads((tmp_path / run / "eval.json").read_text()).items()}

    assert scores("two") == scores("one") and scores("two")["after"]["num_examples"] == 5
    assert "eval after: 5/5" in result.stdout  # the progress counts every process's questions


@pytest.mark.slow
def test_torchrun_signal_ends_in_one_checkpoint_and_a_resume_carries_on(tiny_dir, tmp_path):
    data, out = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40)), tmp_path / "run"
    flags = _ddp_flags(tiny_dir, data, out, "--num_steps", "100000")
    process = subprocess.Popen([*TORCHRUN, os.path.join(HERE, "grpo.py"), *flags], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    try:
        for line in process.stdout:
            if line.startswith("step 1/"):
                break
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        # A Ctrl-C in a terminal: torchrun gets it and forwards it; here each worker gets one more directly.
        os.killpg(process.pid, signal.SIGINT)
        for pid in workers:
            os.kill(int(pid), signal.SIGINT)
        start = time.perf_counter()
        _, stderr = process.communicate(timeout=60)
        assert time.perf_counter() - start < 30, "torchrun had to kill its workers"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]  # no process left behind
    assert "stopped by SIGINT after step" in stderr and "quit without saving" not in stderr
    assert stderr.count("checkpoint saved in") == 1  # process 0 alone speaks
    checkpoints = grpo.list_checkpoints(out)
    assert len(checkpoints) == 1 and grpo.load_training_state(checkpoints[0])["step"] == len(_metrics(out))
    total = str(len(_metrics(out)) + 2)  # where it stopped depends on when the signal came: two steps more
    grpo.main(_ddp_flags(tiny_dir, data, tmp_path / "straight", "--num_steps", total))
    result = _torchrun(_ddp_flags(tiny_dir, data, out, "--num_steps", total, "--resume_from", "latest"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == list(range(1, int(total) + 1))
    assert [m["reward"] for m in _metrics(out)] == [m["reward"] for m in _metrics(tmp_path / "straight")]
    assert torch.allclose(_weights(out), _weights(tmp_path / "straight"), atol=1e-5)


@pytest.mark.slow
def test_torchrun_bad_input_ends_every_process_in_seconds_with_one_line(tiny_dir, tmp_path):
    start = time.perf_counter()
    result = _torchrun(_ddp_flags(tiny_dir, str(tmp_path / "missing.jsonl"), tmp_path / "out"), timeout=60)
    assert result.returncode != 0 and time.perf_counter() - start < 30
    assert result.stderr.count("error: data file not found") == 1 and not (tmp_path / "out").exists()
    result = _torchrun(_ddp_flags(tiny_dir, str(tmp_path / "missing.jsonl"), tmp_path / "out", "--batch_size", "3"))
    assert result.returncode != 0
    assert result.stderr.count("--batch_size 3 is not divisible by the 2 torchrun processes") == 1
    assert "try --batch_size 2 or 4" in result.stderr


@pytest.mark.slow
def test_torchrun_with_one_process_saves_on_a_repeated_signal(tiny_dir, tmp_path):
    # torchrun forwards the signal it gets: a worker may see Ctrl-C twice, which must not skip the save.
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40))
    out = tmp_path / "run"
    flags = _ddp_flags(tiny_dir, data, out, "--num_steps", "100000", "--num_generations", "16", "--max_completion_length", "48")
    process = subprocess.Popen([*TORCHRUN[:-1], "1", os.path.join(HERE, "grpo.py"), *flags], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    output = b""
    try:
        while b"step 2/" not in output:
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, process.stderr.read().decode()[-2000:]
            output += chunk
        worker = int(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(worker, signal.SIGINT)
        while b"finishing this step" not in output:
            output += os.read(process.stdout.fileno(), 4096)
        os.kill(worker, signal.SIGINT)  # the same Ctrl-C again, as torchrun forwards it
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = stderr.decode()
    assert "quit without saving" not in stderr and "checkpoint saved in" in stderr, stderr[-2000:]
    assert len(grpo.list_checkpoints(out)) == 1

