import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Two threads at most (more only contend on the CI's two cores), shared by pytest-xdist's workers where they run.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct on the CPU in float32, loaded once per test session."""
    import qjl

    return qjl.load_model(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer Llama with random weights (head dim 64, 6 query heads over 2 KV heads) for fast shape tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=384, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()
