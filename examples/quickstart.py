import torch
from diffusers import DiTTransformer2DModel

import fora_fx

model = DiTTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=16,
                              sample_size=8, out_channels=8, num_embeds_ada_norm=1000).eval()
fast = fora_fx.transform(model, interval=3, num_steps=10)      # FORA's N = 3, 10-step sampler
x, labels = torch.randn(2, 4, 8, 8), torch.tensor([207, 360])
for t in torch.linspace(999, 0, 10).long():                     # steps 0, 3, 6, 9 recompute
    x = x - 0.1 * fast(x, timestep=t.expand(2), class_labels=labels).sample[:, :4]
print(fora_fx.explain(fast))
