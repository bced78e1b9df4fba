"""Supervised fine-tuning of a causal LM on the chosen answers of preference data: the first stage of DPO.

    python sft_train.py recipes/demo.yaml                                   # tiny offline demo on CPU
    python sft_train.py recipes/pythia28_hh.yaml lr=1e-6 batch_size=64      # recipe + dotted overrides
    accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml sft_train.py recipes/llama7b_hh.yaml
    python sft_train.py recipes/demo.yaml run_dir=runs/demo resume_from=auto   # continue a stopped run

Writes {run_dir}/config.yaml, metrics.jsonl, samples.jsonl, step-{N}/ after each eval and LATEST/ at the end, each checkpoint
holding policy.pt, optimizer.pt and scheduler.pt ({"step_idx", "state", "metrics"}; FSDP/TP: the sharded resume/ state instead
of optimizer.pt); LATEST/policy.pt is the input of DPO.
"""

from __future__ import annotations

import training.cpu_threads  # noqa: F401,I001  first: OpenMP's passive waiting must be set before torch is imported

import torch

from data.packing import to_device
from data.sft import build_split
from data.tokenize import tokens_fingerprint
from modeling.loss import sequence_nll
from stage import Data, Run, Stage, eval_columns, load_splits, step_flops, throughput, train_batch
from training.distributed import data_parallel

LOSSES = ("sft",)  # the objectives this stage trains (training/checks.py check_stage)


def load_data(run: Run, data_files: dict) -> Data:
    """The chosen answers of the preference data as prompt/response examples; their tokens fingerprint the run."""
    train_data, eval_data = load_splits(run, data_files, build_split)
    return Data(train_data, eval_data, fingerprint=tokens_fingerprint(train_data))


def train_step(run: Run, indices: list[int]) -> dict:
    """One optimizer step over the global batch; see modeling/loss.py for why each micro-batch loss is scaled by W / D."""
    config = run.config
    examples = [run.data.train[i] for i in indices]
    world = data_parallel(run.accelerator)[1]
    n_tokens = sum(e["n_supervised"] for e in examples)
    denominator = len(examples) if config.loss.normalize == "example" else n_tokens

    def micro_step(share: list[dict]) -> list[torch.Tensor]:
        batch = to_device(run.collate(share), run.accelerator.device)
        nll, _ = sequence_nll(run.model, batch, config.loss.supervised_logits_only, config.loss.logits_chunk_tokens)
        run.accelerator.backward(nll.sum() * world / denominator)
        return [nll]

    step = train_batch(run, examples, [len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples], micro_step)
    nll = step.values[0]
    loss = nll.mean().item()
    return {
        "loss/train": loss if config.loss.normalize == "example" else nll.sum().item() / n_tokens,
        "logps_train/chosen": -loss,
        "nll_per_token/train": nll.sum().item() / n_tokens,
        "grad_norm": step.grad_norm,
        "lr": step.lr,
        **throughput(run, examples, step, step_flops(run, examples)),
    }


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Summed NLL and token counts over the fixed eval set (never keeps logits)."""
    config = run.config

    def eval_step(indices: list[int]) -> list[torch.Tensor]:
        batch = to_device(run.collate([run.data.eval[i] for i in indices]), run.accelerator.device)
        nll, ntok = sequence_nll(run.model, batch, config.loss.supervised_logits_only, config.loss.logits_chunk_tokens)
        return [nll.float(), ntok]

    nll, ntok = eval_columns(run, eval_step)
    return {
        "loss/eval": nll.mean().item(),
        "logps_eval/chosen": -nll.mean().item(),
        "nll_per_token/eval": (nll.sum() / ntok.sum()).item(),
    }


SFT = Stage("sft", "sft_train.py", __doc__, LOSSES, load_data, train_step, evaluate)

main, cli = SFT.main, SFT.cli  # main(argv) -> the run directory (None after --help); cli(): the `sft-train` command

if __name__ == "__main__":
    cli()
