"""Load an exported Uni-X (or baseline) directory with whatever transformers this interpreter has, as a user would.

Run by tests/test_interchange.py in a subprocess, once with the pinned transformers and once with
the reference's transformers 4.53.3 (an isolated site directory first on PYTHONPATH). It imports
nothing of megatron-unix: only transformers and the files inside the export. Writes to OUT (torch.save):
the transformers version, the remote-code class and logits of every sample, the plain Qwen3ForCausalLM /
Qwen2ForCausalLM logits of the text sample, and a cached greedy generation beside its no-cache
recomputation.

    python load_export.py EXPORT_DIR SAMPLES.pt OUT.pt
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

STEPS = 8


def load(cls, root: str, **kwargs):
    dtype_kwarg = (
        "dtype" if "dtype" in transformers.PreTrainedModel.from_pretrained.__code__.co_varnames else "torch_dtype"
    )  # the name changed in transformers 4.56
    return cls.from_pretrained(root, **{dtype_kwarg: torch.float32}, **kwargs).eval()


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """generate() with its cache, and the same greedy loop recomputing the whole prefix each step."""
    out = model.generate(
        prompts,
        attention_mask=mask,
        max_new_tokens=STEPS,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    seq, seq_mask, recomputed = prompts, mask, []
    for _ in range(STEPS):
        last = model(seq, attention_mask=seq_mask, use_cache=False).logits[:, -1]
        recomputed.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    return {
        "cached_sequences": out.sequences,
        "cached_logits": torch.stack(out.logits, 1),
        "recomputed_sequences": seq,
        "recomputed_logits": torch.stack(recomputed, 1),
    }


def main(root: str, samples_file: str, out_file: str) -> None:
    samples = torch.load(samples_file)
    unix = load(AutoModelForCausalLM, root, trust_remote_code=True)
    text_class = {"qwen3": Qwen3ForCausalLM, "qwen2": Qwen2ForCausalLM}[
        json.loads((Path(root) / "config.json").read_text())["model_type"]
    ]
    plain = load(text_class, root)
    with torch.no_grad():
        result = {
            "version": transformers.__version__,
            "unix_class": type(unix).__module__,
            "class_name": type(unix).__name__,
            "unix": {name: unix(input_ids=t[None]).logits[0] for name, t in samples["rows"].items()},
            "plain_text": plain(input_ids=samples["rows"]["text"][None]).logits[0],
        }
    result["generation"] = greedy(unix, samples["prompts"], samples["prompt_mask"])
    torch.save(result, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
