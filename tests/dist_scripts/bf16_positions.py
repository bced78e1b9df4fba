"""FSDP2 with model.fsdp_policy_mp=bfloat16 on 2 CPU processes: buffer dtypes, rotary cos error and logits at every position.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ... tests/dist_scripts/bf16_positions.py OUT MODEL_DIR...

For each model directory (tests/tiny.py, random weights): the model is built and prepared by the real code
(load_model, prepare_model, accelerator.prepare under forced FSDP2), then one forward of max_length random tokens. The main
process writes OUT.json: per model, the buffers' dtypes on every process, the rotary cos error at the last position
(against float64), and per-position max |logit error| of the FSDP bf16 model and of a plain bf16 model (weights rounded to
bf16, buffers float32: bf16 compute as the policy says) against the float32 model.
"""

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402

from modeling.load import load_model  # noqa: E402
from tests.forcing import forced_accelerator  # noqa: E402
from training.config import build_config  # noqa: E402
from training.distributed import fsdp_plugin, prepare_model  # noqa: E402

MAX_LENGTH = 512
QK_SCALE = 16.0  # random q/k weights are too small for attention to depend on position; these make it


def rotary_cos_error(model, position: int) -> float:
    """max |cos(position x inv_freq) - exact| of the model's rotary module as it will run."""
    rotary = next(m for m in model.modules() if hasattr(m, "inv_freq"))
    dim = 2 * rotary.inv_freq.numel()
    config = model.config
    base = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    exact = torch.cos(position / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    cos, _ = rotary(torch.ones(1, dtype=torch.float32), torch.tensor([[position]]))
    return (cos[0, 0, : dim // 2].double() - exact).abs().max().item()


def check(accelerator, model_dir: str, block: str) -> dict:
    config = build_config({"exp_name": "x", "max_length": MAX_LENGTH, "model": {
        "name": "blank_model", "name_or_path": model_dir, "block_name": block, "random_init": True,
        "fsdp_policy_mp": "bfloat16", "attn_implementation": "sdpa"}})
    accelerator.state.fsdp_plugin = fsdp_plugin(config)
    torch.manual_seed(0)
    model = load_model(config.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "query_key_value")):
                p.mul_(QK_SCALE)
    fp32 = copy.deepcopy(model).eval()
    plain_bf16 = copy.deepcopy(model).eval()
    for p in plain_bf16.parameters():
        p.data = p.data.to(torch.bfloat16)
    prepare_model(config, accelerator, model)
    buffers = {name: str(b.dtype) for name, b in model.named_buffers()}
    cos_error = rotary_cos_error(model, MAX_LENGTH - 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.eval()
    ids = torch.randint(1, fp32.config.vocab_size, (1, MAX_LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sharded = model(input_ids=ids, use_cache=False).logits
        reference = fp32(input_ids=ids, use_cache=False).logits.double()
        plain = plain_bf16(input_ids=ids, use_cache=False).logits
    error = lambda logits: (logits.double() - reference).abs().amax(-1)[0].tolist()  # noqa: E731
    return {"logits_dtype": str(sharded.dtype), "buffers": gather_object([buffers]), "cos_error": cos_error,
            "fsdp_error": error(sharded), "plain_bf16_error": error(plain),
            "fsdp_vs_plain": (sharded.double() - plain.double()).abs().max().item()}


def main(out: str, model_dirs: list[str]) -> None:
    torch.set_num_threads(1)
    accelerator = None
    results = {}
    for model_dir in model_dirs:
        arch = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
        block = {"llama": "LlamaDecoderLayer", "gpt_neox": "GPTNeoXLayer"}[arch]
        config = build_config({"exp_name": "x", "model": {"name_or_path": model_dir, "block_name": block}})
        accelerator = accelerator or forced_accelerator("fsdp", config)
        results[arch] = check(accelerator, model_dir, block)
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
