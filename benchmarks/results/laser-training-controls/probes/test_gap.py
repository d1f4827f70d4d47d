"""The untrained (epochs 0) CPU-profile Laser on amazon-scientific: validation on ALL users, then the test in process
and after reloading the saved checkpoint.   python test_gap.py <seed> [key=value ...]"""
import sys, torch, tempfile
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..', '..', '..'))
from recbole.utils import init_seed, get_trainer
from recbole_llm.core.preparation import data_preparation
from recbole_llm.run.quick_start import build_config, build_model, read_dataset
torch.set_num_threads(1)
seed = int(sys.argv[1]); extra = dict(a.split('=', 1) for a in sys.argv[2:])
import yaml; extra = {k: yaml.safe_load(v) for k, v in extra.items()}
extra.setdefault('suffix_init', 'random')  # the CPU profile's value when these numbers were taken (fbc9d71)
cd = dict(seed=seed, epochs=0, valid_users=None, show_progress=False, checkpoint_dir=tempfile.mkdtemp(), **extra)
config = build_config('Laser', 'amazon-scientific', config_dict=cd, cmd_args=[], profile='cpu')
init_seed(seed, True)
dataset = read_dataset(config)
train, valid, test = data_preparation(config, dataset)
init_seed(seed, True)
model = build_model(config, train._dataset)
trainer = get_trainer(config['MODEL_TYPE'], config['model'])(config, model)
score, vres = trainer.fit(train, valid, saved=True, show_progress=False)
print('valid (all users)', vres, flush=True)
print('test, in process', trainer.evaluate(test, load_best_model=False), flush=True)
print('test, reloaded', trainer.evaluate(test, load_best_model=True), flush=True)
