"""The miniature FLUX demo: a tiny text-to-image teacher trained on scikit-learn's handwritten digits.

- ``config``: resolution, tiny model shapes, prompts ("a handwritten digit seven"), training settings;
- ``data``: the digits upscaled to 32x32 RGB in [-1, 1], and the fixed teacher / classifier split;
- ``tokenizers``, ``components``: CLIP / T5 tokenizers from the prompts' words and the FLUX.1-dev folder
  layout written as PyTorch-layout safetensors (so ``FluxPipeline.from_pretrained`` reads it unchanged);
- ``vae_training``, ``flow_training``, ``train_teacher``: the training of the VAE and the transformer;
- ``teacher``: loading the folder and sampling with Euler steps and true classifier-free guidance;
- ``classifier``, ``metrics``: the digit classifier, prompt adherence and classifier-feature FID.
"""
