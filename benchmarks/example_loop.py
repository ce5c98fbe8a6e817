"""The baseline of ``bench_train.py``: the training loop of diffusers' ``examples/text_to_image/train_text_to_image.py``
(UNet only, epsilon prediction, no EMA, no SNR weighting), its data path included: HF ``imagefolder`` +
``with_transform``, a shuffling ``DataLoader``, torch's default AdamW, Accelerate, the loss gathered and ``.item()``-ed
every step. ``clock`` (``bench_train.StepClock``) is told when the setup is done and when each step ends."""

from __future__ import annotations

from pathlib import Path


def example_loop(args, data: Path, model: Path, clock) -> str:
    """diffusers' ``train_text_to_image.py`` training step and data path, stripped of its options."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from datasets import load_dataset
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    AcceleratorState._reset_state(reset_partial_state=False)  # --in-process: forget the previous mode's settings
    accelerator = Accelerator(mixed_precision=args.precision)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    dataset = load_dataset("imagefolder", data_dir=str(data))
    transform = example_transforms(args.resolution, np)

    def tokenize_captions(examples):
        return tokenizer(list(examples["text"]), max_length=tokenizer.model_max_length, padding="max_length",
                         truncation=True, return_tensors="pt").input_ids

    def preprocess_train(examples):
        images = [image.convert("RGB") for image in examples["image"]]
        examples["pixel_values"] = [transform(image) for image in images]
        examples["input_ids"] = tokenize_captions(examples)
        return examples

    train_dataset = dataset["train"].with_transform(preprocess_train)

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        input_ids = torch.stack([example["input_ids"] for example in examples])
        return {"pixel_values": pixel_values, "input_ids": input_ids}

    loader = torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn, batch_size=args.batch,
                                         num_workers=0, drop_last=True)
    steps = args.warmup + args.steps
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    clock.setup_done()
    step = 0
    while step < steps:
        for batch in loader:
            train_loss = 0.0
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps.long())
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(args.batch)).mean()
                train_loss += avg_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step += 1
            clock.tick()
            if step >= steps:
                break
    return "VAE and text encoder every step" + ("" if args.precision == "no" else f", {args.precision}")


def example_transforms(resolution: int, np):
    """The script's ``Resize(bilinear) → CenterCrop → ToTensor → Normalize([0.5], [0.5])``: torchvision's when
    installed, else the same operations in PIL and numpy (torchvision is no dependency of latentsd)."""
    import torch

    try:
        from torchvision import transforms
    except ImportError:
        from PIL import Image

        def transform(image):
            w, h = image.size
            scale = resolution / min(w, h)
            if scale != 1:
                image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
            w, h = image.size
            left, top = round((w - resolution) / 2), round((h - resolution) / 2)
            image = image.crop((left, top, left + resolution, top + resolution))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
            return (pixels - 0.5) / 0.5

        return transform
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
