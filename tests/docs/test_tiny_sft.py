"""examples/tiny_sft.py, the demonstration trainer behind make demo, on CPU at TP=2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.support.checkout import EXAMPLES, load_script
from tests.support.megatron_utils import require_megatron_core

require_megatron_core()

sft = load_script("examples/tiny_sft.py")

pytestmark = pytest.mark.megatron


def test_encode_prompt_response_masks_only_the_response():
    toks, mask = sft.encode_record({"prompt": "ab", "response": "xyz"}, seq_len=10)
    assert toks[:8] == [sft.BOS, ord("a"), ord("b"), sft.SEP, ord("x"), ord("y"), ord("z"), sft.EOS]
    assert len(toks) == 11 and toks[8:] == [sft.PAD] * 3
    # label position i predicts toks[i + 1]: positions 3..6 predict x, y, z, EOS
    assert mask == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    toks, mask = sft.encode_record({"text": "hi"}, seq_len=4)
    assert toks == [sft.BOS, ord("h"), ord("i"), sft.EOS, sft.PAD] and mask == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="needs 'text' or 'prompt'"):
        sft.encode_record({"question": "?"}, 8)


def test_vocab_is_padded_per_tp():
    assert sft.vocab_size(1) == 264 and sft.vocab_size(2) == 272 and sft.vocab_size(2) % 16 == 0


def _torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(EXAMPLES / "tiny_sft.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["tofu", "cross_entropy"])
def test_sft_trains_saves_and_resumes(tmp_path, loss_type):
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": f"q{i % 5}", "response": f"answer {i % 5}"}) for i in range(40)
        )
    )
    common = [
        "--data",
        str(data),
        "--loss-type",
        loss_type,
        "--tofu-backend",
        "torch",
        "--seq-length",
        "16",
        "--log-interval",
        "10",
        "--micro-batch-size",
        "8",
    ]
    out = _torchrun(*common, "--train-iters", "40", "--save", str(tmp_path / "ck"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [
        tuple(map(float, m))
        for m in re.findall(r"loss ([\d.]+) \| cross entropy ([\d.]+) \| ppl ([\d.]+)", out.stdout)
    ]
    assert len(rows) == 4, out.stdout
    assert rows[-1][1] < rows[0][1] - 0.5, f"cross entropy did not fall: {rows}"
    if loss_type == "cross_entropy":
        assert all(abs(r[0] - r[1]) < 1e-4 for r in rows)  # the loss is the CE itself
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["tp_rank0.pt", "tp_rank1.pt"]
    resumed = _torchrun(*common, "--train-iters", "10", "--load", str(tmp_path / "ck"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first = float(re.search(r"cross entropy ([\d.]+)", resumed.stdout).group(1))
    assert first < rows[0][1] - 0.5, "resumed run did not start from the checkpoint"


def test_sft_rejects_world_size_not_tp():
    out = _torchrun("--tp", "4", "--train-iters", "1")
    assert out.returncode != 0 and "must equal --tp 4" in out.stderr + out.stdout
