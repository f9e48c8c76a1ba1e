"""Teacher and student ``generate_fn``s over one lazily loaded ``FluxPipeline``.

The teacher is the base model (no LoRA) with ``teacher_steps``; the student is the same pipeline after
``load_loras(path_to_lora, lora_scale)`` (one or several files, e.g. the few-step student and a style LoRA, all
live) with ``student_steps`` (without a LoRA, the base model at ``student_steps``). The pipeline is loaded on the
first image that actually has to be generated, so a finished cache never loads FLUX. The teacher must run before
the LoRA is loaded (the benchmark's order).
"""
from .generate import pipeline_generate_fn


class FluxTeacherStudent:
    def __init__(self, pretrained_model_name_or_path, height, width, guidance_scale, teacher_steps, student_steps,
                 path_to_lora=None, lora_scale=None, dtype="float32", single_files=None):
        self.pretrained = pretrained_model_name_or_path
        self.single_files = single_files  # {transformer, vae, clip_l, t5: path}; then ``pretrained`` has the tokenizers
        self.height, self.width, self.guidance_scale = height, width, guidance_scale
        self.teacher_steps, self.student_steps = teacher_steps, student_steps
        self.path_to_lora, self.lora_scale, self.dtype = path_to_lora, lora_scale, dtype
        self._pipe = None
        self._lora_loaded = False

    def pipeline(self):
        if self._pipe is None:
            from ..pipelines.pipeline_flux import FluxPipeline

            if self.single_files:
                self._pipe = FluxPipeline.from_single_files(**self.single_files, tokenizers=self.pretrained,
                                                            dtype=self.dtype)
            else:
                self._pipe = FluxPipeline.from_pretrained(self.pretrained, dtype=self.dtype)
            if hasattr(self._pipe, "set_progress_bar_config"):
                self._pipe.set_progress_bar_config(disable=True)  # one progress bar: the benchmark's
        return self._pipe

    def teacher(self, prompts, seeds):
        if self._lora_loaded:
            raise RuntimeError("teacher images requested after the student LoRA was loaded; generate the teacher first")
        generate = pipeline_generate_fn(self.pipeline(), self.height, self.width, self.teacher_steps, self.guidance_scale)
        return generate(prompts, seeds)

    def student(self, prompts, seeds):
        pipe = self.pipeline()
        if self.path_to_lora and not self._lora_loaded:
            paths = [self.path_to_lora] if isinstance(self.path_to_lora, (str, bytes)) else self.path_to_lora
            scales = [self.lora_scale] if isinstance(self.lora_scale, (int, float)) else self.lora_scale
            pipe.load_loras(paths, scales)
            self._lora_loaded = True
        generate = pipeline_generate_fn(pipe, self.height, self.width, self.student_steps, self.guidance_scale)
        return generate(prompts, seeds)
