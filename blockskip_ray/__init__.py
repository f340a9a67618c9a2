"""blockskip-ray: DiT-BlockSkip personalization of diffusion transformers, as a batch service on Ray.

Layers (design section 3): `models`, `method`, `probe`, `plan_cost` and `store` are pure torch/diffusers/peft;
`distributed` is the only subpackage that imports ray.
"""

__version__ = "0.1.0"
