"""EleutherAI lm-eval 0.4 against the server: `local-completions` on a local multiple-choice task scores every
choice as `hf` does on the same checkpoint (same loglikelihoods to 1e-3, same accuracy), and a generate_until task runs
with batch_size 4 (lists of prompts per request). The tasks are YAML + JSONL files the test writes; nothing is
downloaded."""

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: no hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

from test_serve import start_server  # noqa: E402

QUESTIONS = [
    ("What is the capital of France?", [" Paris", " London", " Rome", " Madrid"], 0),
    ("Which animal barks?", [" cat", " dog", " fish", " bird"], 1),
    ("What colour is the sky on a clear day?", [" green", " red", " blue", " black"], 2),
    ("How many legs does a spider have?", [" eight", " two", " six", " ten"], 0),
    ("What do bees make?", [" milk", " silk", " wool", " honey"], 3),
    ("What is frozen water called?", [" steam", " ice", " sand", " glass"], 1),
]


def write_tasks(d):
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    data = d / "mini.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n")
    (d / "mini_mc.yaml").write_text(
        "task: mini_mc\noutput_type: multiple_choice\n" + common
        + "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (d / "mini_gen.yaml").write_text(
        "task: mini_gen\noutput_type: generate_until\n" + common
        + "doc_to_target: \"{{choices[answer]}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n"
        + "metric_list:\n  - metric: exact_match\n")


def evaluate(model, model_args, task, tasks_dir, batch_size):
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], batch_size=batch_size,
                                  task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                                  device="cpu")
    lls = [[r[0] for r in s["filtered_resps"]] if task == "mini_mc" else s["filtered_resps"]
           for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
    return out["results"][task], lls


def test_lm_eval_local_completions_scores_as_lm_eval_hf(smollm2_dir, tmp_path):
    write_tasks(tmp_path)
    proc, url, _ = start_server(["--ckpt", smollm2_dir, "--model_name", "smol", "--max_seq_len", 256,
                                 "--max_batch_size", 8, "--temperature", 0])
    try:
        api_args = (f"model=smol,base_url={url}/v1/completions,tokenizer={smollm2_dir},tokenizer_backend=huggingface,"
                    f"tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=256")
        ours, our_lls = evaluate("local-completions", api_args, "mini_mc", tmp_path, 4)
        gen, answers = evaluate("local-completions", api_args, "mini_gen", tmp_path, 4)
    finally:
        proc.terminate()
        proc.wait(30)
    hf, hf_lls = evaluate("hf", f"pretrained={smollm2_dir},dtype=float32", "mini_mc", tmp_path, 4)
    assert ours["acc,none"] == hf["acc,none"] and ours["acc,none"] >= 0.5, (ours, hf)
    flat = lambda lls: [x for row in lls for x in row]  # noqa: E731
    assert flat(our_lls) == pytest.approx(flat(hf_lls), abs=1e-3)
    assert len(answers) == len(QUESTIONS) and "exact_match,none" in gen  # the generate_until task ran, batched
