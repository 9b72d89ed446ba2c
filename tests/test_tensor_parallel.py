"""Tensor parallel over 2 CPU processes (gloo) == one process: logits, greedy tokens (also continuous batching),
seeded samples."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minillama.inference.engine import EngineConfig
from minillama.inference.generate import generate, generate_continuous
from minillama.inference.loading import unwrap_merged_lora
from minillama.lora.layers import apply_lora
from minillama.lora.merge import merge_lora
from minillama.inference.sampling import SamplingParams
from minillama.inference.tensor_parallel import apply_tensor_parallel, tp_mesh
from helpers import tiny_model

CASES = {"llama": {}, "tied": {"tie_embeddings": True}, "mixtral": {"n_experts": 4, "n_experts_per_tok": 2}}


def _worker(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = tp_mesh(torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9, 2)]
        tokens = torch.randint(0, 256, (2, 11), generator=g)
        for name, overrides in CASES.items():
            model = tiny_model(**overrides)
            with torch.no_grad():
                ref_logits = model(tokens)
            ref_greedy = generate(model, prompts, max_new_tokens=8)
            ref_sampled = generate(model, prompts, 8, SamplingParams(1.0, top_p=0.9), config=EngineConfig(seed=5))
            ref_continuous = sorted(generate_continuous(model, prompts, 8, config=EngineConfig(batch_size=2)))  # refills

            apply_tensor_parallel(model, mesh)
            assert model.layers[0].attention.wq.weight.to_local().shape[0] == 64 // world, name
            with torch.no_grad():
                logits = model(tokens)
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
            group = mesh.get_group()
            tp = EngineConfig(process_group=group)
            assert generate(model, prompts, max_new_tokens=8, config=tp) == ref_greedy, name
            sampled = generate(model, prompts, 8, SamplingParams(1.0, top_p=0.9),
                               config=EngineConfig(seed=5, process_group=group))
            assert sampled == ref_sampled, name
            assert sorted(generate_continuous(model, prompts, 8, config=EngineConfig(batch_size=2,
                                                                                     process_group=group))) == \
                ref_continuous, name
            everyone = [None] * world
            dist.all_gather_object(everyone, sampled)
            assert all(s == sampled for s in everyone), name

        # a LoRA adapter is merged and its layers swapped back to nn.Linear before splitting (as the CLIs do)
        model = tiny_model()
        apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_b" in n:
                torch.nn.init.normal_(p, std=0.5)
        with torch.no_grad():
            ref_logits = model(tokens)
        merge_lora(model)
        unwrap_merged_lora(model)
        apply_tensor_parallel(model, mesh)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), ref_logits, atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_process_tensor_parallel_equals_single_process():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_indivisible_sizes_are_rejected():
    class FakeMesh:
        def size(self):
            return 3

    with pytest.raises(ValueError, match="divisible by 3"):
        apply_tensor_parallel(tiny_model(), FakeMesh())
