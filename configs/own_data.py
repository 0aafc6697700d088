"""Fine-tune a published or converted CLIPSeg on your own folder (annotations.jsonl, see README):

    python main.py train --config configs/own_data.py --workdir runs/mine --config.data.own_data_dir=my_data

Validation: a deterministic 10 % of the folder's images (left out of training), unless
`--config.eval_data.source=own --config.eval_data.own_data_dir=VAL` names another folder.
"""
from configs.common import train_config


def get_config():
    c = train_config()
    c.init = "CIDAS/clipseg-rd64-refined"
    c.data.source = "own"
    c.data.batch_size = 16
    c.optimizer.lr = 1e-4
    c.optimizer.end_lr = 1e-5
    c.total_steps = 2000
    c.log_every = 20
    c.checkpoint_every = 500
    c.eval_every = 500
    return c
