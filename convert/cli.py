"""``eagle3-mlx convert SRC --mlx-path OUT``: targets (PyTorch safetensors/.bin,
GGUF) and EAGLE-3 heads (every published layout) -> MLX.

Also runnable as ``python -m eagle3_mlx.convert.cli``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eagle3_mlx.convert.atomic import check_output, staged_output
from eagle3_mlx.convert.errors import ConvertError, short

PROG = "eagle3-mlx convert"
DTYPES = ("float16", "bfloat16", "float32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a target model (PyTorch safetensors / pytorch_model.bin / GGUF) or an "
        "EAGLE-3 draft head (official, SpecForge, SGLang, speculators/vLLM, ModelOpt/NVIDIA layouts) "
        "to MLX. The kind of SRC is detected and printed.",
    )
    p.add_argument("src", metavar="SRC", help="local directory, a .gguf file, or a Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, metavar="OUT", help="output directory (must not exist)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (target and head linear layers)")
    p.add_argument("--q-bits", type=int, choices=(4, 8), help="bits per weight (implies -q; default 4)")
    p.add_argument("--q-group-size", type=int, metavar="N", help="quantization group size (default 64; mxfp4: 32)")
    p.add_argument("--q-mode", choices=("affine", "mxfp4"), default="affine", help="quantization mode")
    p.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: the source's)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--target", metavar="T",
                   help="a target model directory or config.json to check a head against")
    p.add_argument("--aux-layer-ids", metavar="I,J,K",
                   help="heads: override the aux target layers (HF hidden-states indices)")
    p.add_argument("--rope-theta", type=float, metavar="BASE", help="heads: override the draft RoPE base")
    p.add_argument("--rope-from-target", action="store_true",
                   help="heads: use the --target's RoPE base and scaling (YaRN, llama3) in the draft")
    p.add_argument("--draft-feedback", choices=("prenorm", "normed"),
                   help="heads: the state fed back between draft steps (default: normed when the config "
                        "sets norm_output, else prenorm; SpecForge heads trained before 2026-09 need prenorm)")
    return p


def _say(msg: str):
    print(msg, flush=True)


def _read_target_config(spec: str):
    from eagle3_mlx.convert.sources import read_json

    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConvertError(spec, "--target: no such target directory or config.json")
    return read_json(p), p


def _convert_gguf(src: Path, out: Path, args, quant):
    _say(f"detected: GGUF target model ({src.name})")
    try:
        from eagle3_mlx.convert.gguf_target import convert_gguf
    except ImportError as e:
        if getattr(e, "name", "") and e.name.endswith("gguf_target"):
            raise ConvertError(src, "GGUF conversion is not available in this installation "
                                    "(eagle3_mlx.convert.gguf_target is missing)") from None
        raise ConvertError(src, f"GGUF conversion needs a missing package ({short(e)})") from None
    kw = dict(dtype=args.dtype, quantize=quant is not None, log=_say)
    if quant:
        kw.update(q_bits=quant[1], q_group_size=quant[0], q_mode=args.q_mode)
    with staged_output(out, args.force) as stage:
        try:
            convert_gguf(src, stage, **kw)
        except ValueError as e:  # GGUFError (a ValueError) already names file and reason
            path, reason = getattr(e, "path", None), getattr(e, "reason", None)
            raise ConvertError(path or src, reason or short(e)) from None
    _say(f"wrote MLX model to {out}")


def run(args) -> None:
    from eagle3_mlx.convert.heads import quant_defaults

    out = check_output(args.mlx_path, args.force)  # refuse early, before any heavy work
    quantize = args.quantize or args.q_bits is not None
    quant = quant_defaults(args.q_mode, args.q_group_size, args.q_bits) if quantize else None
    aux = None
    if args.aux_layer_ids:
        try:
            aux = [int(x) for x in args.aux_layer_ids.split(",")]
        except ValueError:
            raise ConvertError("--aux-layer-ids", f"expected comma-separated integers, got {args.aux_layer_ids!r}") from None
    target = _read_target_config(args.target) if args.target else None
    if args.rope_from_target and target is None:
        raise ConvertError("--rope-from-target", "needs --target (the verifier whose RoPE the draft takes)")

    from eagle3_mlx.convert.sources import WeightFiles, read_json, resolve_source

    src = resolve_source(args.src)
    if src.is_file():
        if src.suffix.lower() == ".gguf":
            return _convert_gguf(src, out, args, quant)
        raise ConvertError(src, "expected a model directory, a .gguf file, or a Hugging Face repo id")
    ggufs = sorted(src.glob("*.gguf"))
    if not (src / "config.json").exists():
        if len(ggufs) == 1:
            return _convert_gguf(ggufs[0], out, args, quant)
        raise ConvertError(src, "no config.json: not a Hugging Face model or EAGLE-3 head directory"
                                + (" (several .gguf files: pass one)" if ggufs else ""))
    config = read_json(src / "config.json")
    weights = WeightFiles(src)

    from eagle3_mlx.convert.heads import HeadSource, convert_head, looks_like_head

    if looks_like_head(config, weights.shapes):
        hs = HeadSource(src, config, weights, log=_say)
        _say(f"detected: {hs.describe()}")
        with staged_output(out, args.force) as stage:
            head = convert_head(hs, stage, dtype=args.dtype, quantize=quantize,
                                q_bits=quant and quant[1], q_group_size=quant and quant[0],
                                q_mode=args.q_mode, aux_layer_ids=aux, rope_theta=args.rope_theta,
                                target_config=target, feedback=args.draft_feedback,
                                rope_from_target=args.rope_from_target, log=_say)
        c = head.config
        _say(f"wrote MLX head to {out} (layers {c.num_hidden_layers}, hidden {c.hidden_size}, "
             f"draft vocab {c.draft_vocab_size}/{c.vocab_size}, rope_theta {c.rope_theta:g}, "
             f"aux layers {c.aux_layer_ids if c.aux_layer_ids is not None else 'default'})")
        return

    if "model_type" not in config:
        raise ConvertError(src, "unknown layout: config.json has no model_type and the weights match "
                                "no EAGLE-3 head layout")
    from eagle3_mlx.convert.targets import convert_target, target_description

    _say(f"detected: {target_description(config, weights)}")
    if target is not None:
        _say("note: --target only applies to heads; ignored")
    with staged_output(out, args.force) as stage:
        convert_target(src, stage, config=config, weights=weights, dtype=args.dtype,
                       quantize=quantize, q_bits=quant and quant[1], q_group_size=quant and quant[0],
                       q_mode=args.q_mode, log=_say)
    _say(f"wrote MLX model to {out}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.mlx_path} was not written", file=sys.stderr)
        return 130
    except Exception as e:  # unexpected: still one line unless debugging
        if os.environ.get("EAGLE3_MLX_DEBUG"):
            raise
        print(f"{PROG}: error: {args.src}: {type(e).__name__}: {short(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
