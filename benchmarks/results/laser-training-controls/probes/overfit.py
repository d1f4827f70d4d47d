"""Can Laser's trainable parts fit ONE batch? IIC loss over Adam steps against the fixed initial item matrix.
    python overfit.py temperature=0.2 learning_rate=1e-3 [steps=60]"""
import sys, time, torch, yaml
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..', '..', '..'))
from recbole.data import create_dataset
from recbole.utils import init_seed
from recbole_llm.core.preparation import data_preparation
from recbole_llm.run.quick_start import build_config, build_model
torch.set_num_threads(1)
overrides = {k: yaml.safe_load(v) for k, v in (a.split('=', 1) for a in sys.argv[1:])}
steps = overrides.pop('steps', 60)
overrides.setdefault('suffix_init', 'random')  # the CPU profile's value when these numbers were taken (fbc9d71)
overrides.update(seed=1, show_progress=False, state='ERROR', score_centering=overrides.get('score_centering', 'whiten'))
config = build_config('Laser', 'amazon-scientific', config_dict=overrides, cmd_args=[], profile='cpu')
init_seed(1, True)
dataset = create_dataset(config)
train, valid, _ = data_preparation(config, dataset)
init_seed(1, True)
model = build_model(config, train._dataset)
opt = torch.optim.Adam(model.parameter_groups(config['learning_rate']))
batch = next(iter(train))
model.refresh_item_matrix(force=True, show_progress=False); model.train()
t = time.time(); out = []
for s in range(steps + 1):
    opt.zero_grad()
    iic, lb = model.calculate_loss(batch)
    if s % 10 == 0:
        out.append(round(iic.item(), 3))
    (iic + lb).backward(); opt.step()
print(sys.argv[1:], 'loss every 10 steps:', out, f'{time.time()-t:.0f}s', flush=True)
