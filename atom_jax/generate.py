"""`python -m atom_jax.generate --prompt "..."`: one completion from the command line."""
from __future__ import annotations

import argparse
import json
import sys

from atom_jax.cli_args import add_engine_args, engine_config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atom_jax.generate", description=__doc__)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--json", action="store_true", help="print text, token ids and finish reason as JSON")
    add_engine_args(parser)
    args = parser.parse_args(argv)

    from atom_jax.engine import LLM
    from atom_jax.sampling_params import SamplingParams
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k)
        llm = LLM.from_config(engine_config_from_args(args))
        if args.chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
        else:
            out = llm.generate(args.prompt, params)[0]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    completion = out.outputs[0]
    if args.json:
        print(json.dumps({"text": completion.text, "token_ids": completion.token_ids,
                          "finish_reason": completion.finish_reason,
                          "prompt_tokens": len(out.prompt_token_ids)}))
    else:
        print(completion.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
