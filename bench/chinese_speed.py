"""Seconds for one image from a Chinese prompt against the same prompt in English (#50: ≤ 1 s at 20 steps): the
default model, its own sampler and guidance, best of 5, the prompt cache cleared before each call so the text
encoder (the Chinese student or MiniLM) is timed too.

    python bench/chinese_speed.py
"""

from __future__ import annotations

import time

from common import ROOT  # noqa: F401  (the repository on the path)


def main() -> None:
    from latentgen.cli import quiet_libraries
    from latentgen.generation.models import DEFAULT_MODEL, open_pipeline

    quiet_libraries()
    pipe = open_pipeline(DEFAULT_MODEL, embeddings_dir=None)

    def best(prompt: str, repeat: int = 5) -> float:
        pipe(prompt, seed=0, num_inference_steps=20)
        times = []
        for i in range(repeat):
            pipe.clear_prompt_cache()
            start = time.perf_counter()
            pipe(prompt, seed=i, num_inference_steps=20)
            times.append(time.perf_counter() - start)
        return min(times)

    print("| prompt | s per image |\n|---|---|")
    for prompt in ("蓝色背景上的红色圆形", "a red circle on a blue background"):
        print(f"| {prompt} | {best(prompt):.3f} |", flush=True)


if __name__ == "__main__":
    main()
