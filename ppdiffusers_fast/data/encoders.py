"""FLUX conditioning encoders as plain callables, used by the latent cache and on-the-fly training.

* :class:`VaeLatentEncoder`: ``pixel_values [B, 3, H, W]`` in [-1, 1] ->
  ``latents [B, 16, H/8, W/8] = (z - shift_factor) * scaling_factor``, ``z`` the mode (mean) of the
  VAE posterior (or a sample of it), as the FLUX training scripts normalise latents.
* :class:`FluxTextEncoder`: captions -> ``(prompt_embeds [B, T, D], pooled_prompt_embeds [B, P])``:
  the T5 encoder's last hidden state over ``max_sequence_length`` tokens (padded, no attention
  mask, as the FLUX pipeline) and CLIP's pooled output over 77 tokens.
"""
import paddle


class VaeLatentEncoder:
    """Wraps a ppdiffusers ``AutoencoderKL`` (FLUX config: 16 latent channels, scaling and shift).

    Args:
        vae: ``AutoencoderKL``; put in eval mode here.
        sample: draw ``z`` from the posterior instead of taking its mode.
    """

    def __init__(self, vae, sample=False):
        self.vae = vae
        self.vae.eval()
        self.sample = sample
        self.scaling_factor = vae.config.scaling_factor
        self.shift_factor = vae.config.shift_factor or 0.0

    @paddle.no_grad()
    def __call__(self, pixel_values):
        pixel_values = paddle.to_tensor(pixel_values).astype(self.vae.dtype)
        distribution = self.vae.encode(pixel_values).latent_dist
        z = distribution.sample() if self.sample else distribution.mode()
        return (z - self.shift_factor) * self.scaling_factor


class FluxTextEncoder:
    """CLIP (pooled) + T5 (sequence) text conditioning of FLUX.

    Args:
        clip_tokenizer, clip_text_model: ``CLIPTokenizer`` and ``CLIPTextModel``.
        t5_tokenizer, t5_encoder: ``T5Tokenizer`` and ``T5EncoderModel``.
        max_sequence_length: T5 tokens (512 for FLUX.1-dev).
        clip_max_length: CLIP tokens (77 for FLUX).
    """

    def __init__(self, clip_tokenizer, clip_text_model, t5_tokenizer, t5_encoder, max_sequence_length=512,
                 clip_max_length=77):
        self.clip_tokenizer, self.clip_text_model = clip_tokenizer, clip_text_model
        self.t5_tokenizer, self.t5_encoder = t5_tokenizer, t5_encoder
        self.max_sequence_length = max_sequence_length
        self.clip_max_length = clip_max_length
        clip_text_model.eval()
        t5_encoder.eval()

    @paddle.no_grad()
    def __call__(self, captions):
        captions = list(captions)
        t5_ids = self.t5_tokenizer(captions, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, return_tensors="pd")["input_ids"]
        prompt_embeds = self.t5_encoder(t5_ids)[0]
        clip_ids = self.clip_tokenizer(captions, padding="max_length", max_length=self.clip_max_length,
                                       truncation=True, return_tensors="pd")["input_ids"]
        pooled_prompt_embeds = self.clip_text_model(clip_ids).pooler_output
        return prompt_embeds, pooled_prompt_embeds
