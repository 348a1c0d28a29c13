"""dsplan: DeepSpeed + LLaMA-Factory configs that fit the first time.

Data flow: hardware profile -> model spec -> memory estimate -> plan -> render -> launch.
Nothing in this package imports torch, deepspeed or llamafactory at module level;
the real tools are only reached through subprocesses.
"""

__version__ = "0.1.0"
