"""The fields every training config has (`python main.py train --config configs/NAME.py`).

Each `configs/NAME.py` starts from `train_config()` and changes values only, so one override
(`--config.data.batch_size=32`, `--config.mesh.fsdp=2`) works with every config.
"""
import ml_collections

from configs import data_phrasecut


def model_config() -> ml_collections.ConfigDict:
    """The CLIPSeg architecture (`clipseg_jax.CLIPSegConfig` fields). Where it comes from: with `init` set, all of
    it from that checkpoint (only `decoder_dropout` applies); with `init_clip` set, the towers (`text`, `vision`,
    `projection_dim`) from that CLIP; otherwise everything from here (random CLIP)."""
    m = ml_collections.ConfigDict()
    m.extract_layers = (3, 7, 9)  # the paper's yamls; the released weights are run with (3, 6, 9) (spec §7.5)
    m.reduce_dim = 64
    m.decoder_num_attention_heads = 4
    m.decoder_intermediate_size = 2048
    m.conditional_layer = 0
    m.use_complex_transposed_convolution = False
    m.decoder_dropout = 0.1  # torch TransformerEncoderLayer's default, as the original trained
    m.projection_dim = 512
    # ViT-B/16 and CLIP's text transformer (used only when init_clip is '', i.e. a random CLIP)
    m.vision = ml_collections.ConfigDict(dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, image_size=224, patch_size=16))
    m.text = ml_collections.ConfigDict(dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                            num_attention_heads=8))
    return m


def optimizer_config() -> ml_collections.ConfigDict:
    """torch.optim.AdamW defaults with the paper's lr; cosine to end_lr over decay_steps, stepped every iteration."""
    o = ml_collections.ConfigDict()
    o.lr = 1e-3
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.01
    o.schedule = "cosine"   # 'cosine' (CosineAnnealingLR to end_lr) or 'constant'
    o.end_lr = 1e-4
    o.warmup_steps = 0      # linear warmup from 0 (the paper: none)
    o.decay_steps = 0       # 0 = total_steps (CosineAnnealingLR's T_max)
    o.grad_clip_norm = 0.0  # 0 = no clipping (the paper: none)
    return o


def train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.init = ""    # a CLIPSeg checkpoint to start from (hub id, HF dir or ours); '' = CLIP from init_clip + new decoder
    c.init_clip = "openai/clip-vit-base-patch16"  # transformers CLIPModel dir / hub id, or OpenAI's ViT-B/16 state
                                                  # dict (.pt/.pth); '' = random CLIP (model.vision / model.text)
    c.model = model_config()
    c.data = data_phrasecut.get_config()        # batch_size is the global batch
    c.eval_data = data_phrasecut.get_config()
    c.eval_data.source = ""                     # '' = the held-out part of data's source
    c.eval_data.split = "validation"
    c.eval_data.batch_size = 32
    c.eval_data.with_visual = False             # validation conditions on the raw phrase (the PhraseCut protocol)
    c.eval_threshold = 0.3                      # fgiou / miou reported at this threshold (the paper's Table 3)
    c.optimizer = optimizer_config()
    # The original's mixing (`mix: True`): per sample a text weight w ~ U(text_weight_min, text_weight_max), w = 1
    # where the sample has no valid visual support; condition = w * text + (1 - w) * visual. Needs data.with_visual.
    c.mix = ml_collections.ConfigDict(dict(text_weight_min=0.0, text_weight_max=0.5))
    c.total_steps = 20000
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.eval_every = 5000       # 0 = only at the end
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # data = -1: the devices fsdp leaves
    c.dtype = ""              # compute dtype of the CLIP towers; '' = bfloat16 on GPU/TPU, float32 on CPU
    c.decoder_dtype = "float32"
    c.freeze_clip = True      # the paper: CLIP frozen, only the decoder trains
    c.attention = ""          # '' = the default einsum attention; 'xla' / 'cudnn' / 'auto' (set_attention_implementation)
    c.encode_chunk = -1       # CLIP passes in groups of N samples (lax.map); 0 = whole batch; -1 = 1 on a single CPU
                              # device for large activations (ViT-B/16 at 352: cache-friendly there), 0 elsewhere
    c.text_cache = False      # compute each distinct prompt's frozen text embedding once and reuse it
    c.peak_tflops = 0.0       # per-device peak for MFU; 0 = from a table of known accelerators
    c.progress = True         # progress bar (process 0)
    # jax.distributed: '' / 0 / -1 = auto-detect (TPU pods, SLURM, ...) or one process
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c
