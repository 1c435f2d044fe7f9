"""torch.profiler of one LongLoRA and one LoRA-full step: where the time goes."""

from __future__ import annotations

from .cells import METHOD_NAMES, Runner


def mode_profile(runner: Runner, args):
    for method in ("longlora", "lora"):
        print(f"\n## profile: {METHOD_NAMES[method]} at L={args.profile_length} (self CPU time, top ops)")
        runner.run(method=method, length=args.profile_length, profile=args.profile_rows, steps=1)
