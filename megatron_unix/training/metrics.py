"""An iteration's reduced sums, model FLOPs (Megatron's formula, attention counted per actual
segment), MFU, the log lines and the log sinks.

Training FLOPs are 3x the forward (backward = 2x forward), as in Megatron-LM; activation recompute
is not counted (model FLOPs, not hardware FLOPs). The attention term counts the causal (query, key)
pairs each layer really computes: per document in shared layers, per document and modality in
separated layers (padding is its own document, and it is computed, so it counts).
"""

from __future__ import annotations

import datetime
import json
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_unix import platform
from megatron_unix.data.vocabulary import vision_mask
from megatron_unix.files import write_text_atomically
from megatron_unix.model.config import UniXConfig
from megatron_unix.model.routing import UniXPackedSeqParams

PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
    "GH200": 989.0,
}
"""Dense bf16 peak per device by name fragment (vendor data sheets)."""


@dataclass
class StepStats:
    """Global sums of one iteration (or one evaluation), identical on every rank after reduction."""

    values: torch.Tensor = field(default_factory=lambda: torch.zeros(12, dtype=torch.float64))
    FIELDS = (
        "loss_sum",
        "micro_batches",
        "text_sum",
        "text_n",
        "vision_sum",
        "vision_n",
        "tokens",
        "shared_pairs",
        "separated_pairs",
        "stop_signal",
        "stop_duration",
        "vision_tokens",
    )

    def __getitem__(self, name: str) -> float:
        return float(self.values[self.FIELDS.index(name)])

    def add(self, name: str, value: float) -> None:
        self.values[self.FIELDS.index(name)] += value

    def all_reduce(self) -> StepStats:
        """Summed over the world (one collective for everything an iteration reports)."""
        values = self.values.to(platform.device())
        dist.all_reduce(values)
        return StepStats(values.cpu())

    @property
    def loss(self) -> float:
        return self["loss_sum"] / max(self["micro_batches"], 1)

    @property
    def text_loss(self) -> float | None:
        return self["text_sum"] / self["text_n"] if self["text_n"] else None

    @property
    def vision_loss(self) -> float | None:
        return self["vision_sum"] / self["vision_n"] if self["vision_n"] else None


def _causal_pairs(params: UniXPackedSeqParams, pad: int = 0) -> int:
    """Sum of n(n+1)/2 over the segments of a stream (the causal pairs within each); a modality
    stream's trailing ``pad`` segment is dropped (its outputs are discarded)."""
    lengths = (params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).to(torch.float64)
    if pad:
        lengths = lengths[:-1]
    return int((lengths * (lengths + 1) / 2).sum())


def attention_pairs(routing: UniXPackedSeqParams) -> tuple[int, int]:
    """(pairs of a shared layer, pairs of a separated layer) for a micro-batch: the segments its
    routing (the model's own, ``build_routing``) attends within."""
    if routing.routes is None:
        return _causal_pairs(routing), 0
    return _causal_pairs(routing), sum(_causal_pairs(r.params, r.padded_len - r.length) for r in routing.routes)


def vision_token_count(batch: dict[str, torch.Tensor], config: UniXConfig) -> int:
    """Vision tokens of a ``[b, s]`` micro-batch (they take the vision MLPs, whose width MoT may change)."""
    return int(vision_mask(batch["tokens"], config.vq_offset, config.boi_id, config.separator_ids).sum())


def training_flops(
    config: UniXConfig,
    padded_vocab: int,
    tokens: int,
    shared_pairs: int,
    separated_pairs: int,
    vision_tokens: int = 0,
) -> float:
    """fwd+bwd FLOPs of ``tokens`` tokens whose attention covers the given pair counts per layer.

    Every token passes one copy of each weight (Uni-X's layer copies, HardMoE's MLPs, MoT's q/k/v and
    MLPs), so the linear count is the dense model's, except that ``vision_tokens`` take MoT's vision MLPs
    of ``ffn_vision_size``. HardMoE and MoT attend over the whole document: their layers count as shared."""
    h, d = config.hidden_size, config.kv_channels
    q_width, kv_width = config.num_attention_heads * d, (config.num_query_groups or config.num_attention_heads) * d
    linear = 2 * h * (q_width + 2 * kv_width) + 2 * q_width * h + 6 * h * config.ffn_hidden_size
    per_pair = 4 * q_width  # QK^T and AV
    separated = config.num_separated_layers
    shared = config.num_layers - separated
    forward = tokens * (config.num_layers * linear + 2 * h * padded_vocab) + per_pair * (
        shared * shared_pairs + separated * separated_pairs
    )
    forward += vision_tokens * config.num_vision_copy_layers * 6 * h * (config.ffn_vision_size - config.ffn_hidden_size)
    return 3.0 * forward


def peak_tflops(override: float | None) -> float | None:
    """Per-device peak for MFU: the flag, else a known GPU's bf16 peak, else None (CPU)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _format(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def iteration_line(record: dict[str, Any], train_iters: int, global_batch_size: int, eta_seconds: float) -> str:
    """Megatron-LM's iteration log line for a metrics ``record``, with per-modality losses and the ETA."""
    return (
        f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] iteration {record['iteration']:8d}/{train_iters:8d} | "
        f"consumed samples: {record['consumed_samples']:12d} | elapsed time per iteration (ms): "
        f"{record['iteration_ms']:.1f} | tokens/s: {record['tokens_per_sec']:,.0f} | "
        f"TFLOP/s/device: {record['tflops']:.3f} | MFU: {_format(record['mfu'], '.1%')} | "
        f"learning rate: {record['lr']:.6E} | global batch size: {global_batch_size:5d} | "
        f"lm loss: {record['loss']:.6E} | text loss: {_format(record['text_loss'], '.6E')} | "
        f"vision loss: {_format(record['vision_loss'], '.6E')} | grad norm: {_format(record['grad_norm'], '.3f')} | "
        f"mem (GiB): {record['mem_gib']:.2f} | skipped iterations: {record['skipped_iterations']:3d} | "
        f"ETA: {datetime.timedelta(seconds=round(eta_seconds))}"
    )


def validation_line(total: StepStats, iteration: int) -> str:
    return (
        f" validation loss at iteration {iteration} | lm loss: {total.loss:.6E} | "
        f"text loss: {_format(total.text_loss, '.6E')} | vision loss: {_format(total.vision_loss, '.6E')}"
    )


def memory_gib() -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsSinks:
    """metrics.jsonl, TensorBoard and wandb; only constructed on the logging rank."""

    def __init__(
        self,
        metrics_file: str | None,
        tensorboard_dir: str | None,
        wandb_project: str | None,
        wandb_name: str | None,
        wandb_dir: str | None,
        config: dict[str, Any],
        resume_iteration: int,
    ) -> None:
        self.metrics_file = Path(metrics_file) if metrics_file else None
        if self.metrics_file:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            _truncate_after(self.metrics_file, resume_iteration)
        self.tensorboard = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir)
        self.wandb = None
        if wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=wandb_project, name=wandb_name, dir=wandb_dir or None, config=config, resume="allow"
            )

    def write(self, record: dict[str, Any]) -> None:
        step = record["iteration"]
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def _truncate_after(path: Path, iteration: int) -> None:
    """On resume, drop records of iterations after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
    write_text_atomically(path, "".join(line + "\n" for line in kept))
