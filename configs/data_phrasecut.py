"""Data config for PC+ training (ml_collections), consumed by `data_pipelines.make_pcplus`."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "tfds"          # 'tfds' (prepared `phrasecut`), 'cached' (build_cache output) or 'own'
    c.data_dir = ""            # TFDS data_dir ('' = TFDS default ~/tensorflow_datasets)
    c.split = "train"
    c.cache_dir = ""           # for source='cached'
    c.own_data_dir = ""        # for source='own': folder with annotations.jsonl
    c.batch_size = 64          # per host
    c.seed = 0
    c.negative_prob = 0.2      # q_neg of the paper / rd64-uni yaml
    c.visual_prompt_mode = "crop_blur_highlight352"
    c.support_render = "host"  # 'device': ship raw supports + masks, render in the step (prompts_jax)
    c.image_size = 352
    c.support_excludes_query = True   # False reproduces the original (support may be the query)
    c.min_crop_fg = 0.05
    c.crop_iterations = 50
    c.workers = 0              # > 0: build batches in this many processes (no shared GIL) instead of tf.data threads
    return c
