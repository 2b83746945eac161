"The embedding cache end to end on tiny local checkpoints (save_pretrained layout): embed, train on it, evaluate, diagnose; stale and missing-weights refusals."
import json, shutil
import pytest
from mmfusion.cli import main
from mmfusion.config import StaleEmbeddingsError, apply_overrides, load_config, resolve_config
from mmfusion.embed import save_tiny_checkpoints
from mmfusion.runs import diagnose, evaluate, train

ROOT = __import__('pathlib').Path(__file__).resolve().parents[1]
CFG = str(ROOT/'configs'/'weld_pretrained.yaml')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('embed')
    ck = save_tiny_checkpoints(tmp/'weights')
    shutil.copytree(ROOT/'data'/'weld', tmp/'data'/'weld')
    over = [f'model.encoders.video.weights={ck["vjepa2"]}', f'model.encoders.images.encoder.weights={ck["dinov2"]}',
            f'model.encoders.audio.weights={ck["ast"]}', f'data.root={tmp/"data"}', f'runs_dir={tmp/"runs"}', 'training.epochs=2',
            'training.progress=false', 'training.tensorboard=false']
    assert main(['embed', CFG, *over, '--out', str(tmp/'cache'), '--device', 'cpu']) in (None, 0)
    return tmp, ck, over


def test_missing_weights_name_the_checkpoint_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"huggingface-cli download facebook/vjepa2-vitl-fpc64-256 .*copy that folder to .*weights/vjepa2") as e:
        resolve_config(load_config(CFG))
    for ck in ('facebook/dinov2-base', 'MIT/ast-finetuned-audioset-10-10-0.4593'): assert f"huggingface-cli download {ck} " in str(e.value)  # all at once


def test_cache_index_keeps_missing_modalities_missing(setup):
    tmp, _, _ = setup
    index = json.loads((tmp/'cache'/'index.json').read_text())
    assert set(index['modalities']) == {'video', 'images', 'audio'}  # the sensors' encoder trains: not cached
    no_audio = [i for i, s in index['samples'].items() if 'audio' not in s]
    assert len(no_audio) == 3 and index['modalities']['audio']['rows'] == sum(index['splits'].values()) - 3
    assert index['modalities']['images']['shape'] == [5, 32] and index['modalities']['images']['reader']['reader'] == 'image_set'
    assert index['modalities']['audio']['reader']['features'] == 'fbank'


def test_train_evaluate_diagnose_on_the_cache(setup):
    tmp, _, over = setup
    run = train(CFG, [*over, f'data.embeddings={tmp/"cache"}'], verbose=False)
    assert run.config['model']['encoders']['audio'] == {'name': 'precomputed', 'in_dim': 32}
    assert run.metrics['status'] == 'completed' and 0 <= run.metrics['primary']['value'] <= 1
    ev = evaluate(run.dir)
    assert ev['headline']['name'] and 0 <= ev['headline']['value'] <= 1
    d = diagnose(run.dir)  # always run: the diagnosis of a cache-trained run judges every modality, cached or not
    judged = {f.subject for f in d.findings if f.check == 'modality_contribution'}
    assert {'video', 'images', 'audio', 'sensors'} <= judged, judged


def test_a_cache_trained_run_predicts_from_files(setup):
    "Predictor.from_run puts the frozen encoders back in front of a cache-trained model: on a test sample's files it gives what the model gives on the cache"
    import torch
    from mmfusion.config import RunFolder, build_splits
    from mmfusion.deploy import Predictor
    from mmfusion.model import load_model
    tmp, _, over = setup
    run = train(CFG, [*over, f'data.embeddings={tmp/"cache"}'], verbose=False)
    from mmfusion.embed import uncached_config
    cached_test = build_splits(run.config['data'], run.config['seed'])['test']
    files_test = build_splits(uncached_config(run.config)['data'], run.config['seed'])['test']  # the same samples, as files
    model = load_model(RunFolder(run.dir).checkpoint()).eval()
    p = Predictor.from_run(run.dir)
    recs = files_test.records[:4]
    assert [r.id for r in recs] == [r.id for r in cached_test.records[:4]]
    assert not any(type(v).__name__ == 'ArrayRow' for r in recs for v in r.sources.values())
    preds = p.predict([{m: v for m, v in r.sources.items() if v is not None and m in p.specs} for r in recs], [r.id for r in recs])
    with torch.no_grad(): want = model(cached_test.collate([cached_test[i] for i in range(4)])).output['embedding']
    got = torch.tensor([q.embedding for q in preds])
    assert torch.allclose(got, torch.nn.functional.normalize(want.float(), dim=-1), atol=1e-4), (got - want).abs().max()


def test_a_changed_input_or_weights_make_the_cache_stale(setup):
    tmp, ck, over = setup
    img = sorted((tmp/'data'/'weld'/'samples').glob('*'))[0]/'images'/'angle_2.png'
    original = img.read_bytes()
    img.write_bytes(original + b'\0')
    try:
        with pytest.raises(StaleEmbeddingsError, match=f"{img.parent.parent.name} \\(images\\)"):
            train(CFG, [*over, f'data.embeddings={tmp/"cache"}'], verbose=False)
    finally: img.write_bytes(original)
    cfg = ck['dinov2']/'config.json'
    text = cfg.read_text()
    cfg.write_text(text.replace('"layer_norm_eps": 1e-06', '"layer_norm_eps": 1e-05'))
    try:
        with pytest.raises(StaleEmbeddingsError, match='the weights of model.encoders.images changed'):
            resolve_config(apply_overrides(load_config(CFG), [*over, f'data.embeddings={tmp/"cache"}']))
    finally: cfg.write_text(text)


def test_one_changed_number_in_a_checkpoint_makes_the_cache_stale(setup):
    "The weights' identity is a hash of the tensors as loaded: one value of one tensor, same files otherwise, is another encoder"
    from safetensors.torch import load_file, save_file
    tmp, ck, over = setup
    f = ck['ast']/'model.safetensors'
    original = f.read_bytes()
    tensors = load_file(f)
    k = sorted(tensors)[0]
    tensors[k].view(-1)[0] += 1e-3
    save_file(tensors, f, metadata={'format': 'pt'})
    try:
        with pytest.raises(StaleEmbeddingsError, match=r"the weights of model.encoders.audio changed \(ast, loaded from .*ast-tiny.*: the embeddings of its \d+ samples \(samples/"):
            resolve_config(apply_overrides(load_config(CFG), [*over, f'data.embeddings={tmp/"cache"}']))
    finally: f.write_bytes(original)
    resolve_config(apply_overrides(load_config(CFG), [*over, f'data.embeddings={tmp/"cache"}']))  # the original checkpoint: accepted again


def test_a_changed_seed_makes_a_cache_of_random_weights_stale(tmp_path):
    "A frozen encoder with random weights (from a config, no checkpoint) is identified by the weights its seed draws: another seed is refused, naming it and the samples"
    from mmfusion.embed import embed
    from mmfusion.encoders import TINY_DINOV2
    dino = json.dumps({'name': 'image_set', 'encoder': {'name': 'dinov2', 'config': TINY_DINOV2, 'freeze': True}, 'aggregation': 'mean'})
    over = [f'data.root={ROOT/"data"}', f'runs_dir={tmp_path/"runs"}', f'model.encoders.images={dino}']
    cfg = str(ROOT/'configs'/'weld.yaml')
    index = embed(cfg, tmp_path/'cache', [*over, 'seed=0'], device='cpu', progress=False)
    resolve_config(apply_overrides(load_config(cfg), [*over, 'seed=0', f'data.embeddings={tmp_path/"cache"}']))  # the same seed: accepted
    first = next(i for i, s in index['samples'].items() if 'images' in s)  # the message lists the samples in the cache's order
    with pytest.raises(StaleEmbeddingsError, match=rf"the weights of model.encoders.images changed \(dinov2, random weights drawn from seed 1 "
                                                   rf"\(the cache's: seed 0\).*embeddings of its 96 samples \({first}, "):
        resolve_config(apply_overrides(load_config(cfg), [*over, 'seed=1', f'data.embeddings={tmp_path/"cache"}']))


def test_a_run_refuses_a_cache_remade_after_it_was_trained(setup):
    "A cache-trained run records the cache's identity; once the cache is re-made with other weights, evaluate (CLI and Python) and serve refuse, naming the run, the cache and what changed"
    from mmfusion.deploy import Predictor
    tmp, ck, over = setup
    cache = tmp/'cache_remade'
    assert main(['embed', CFG, *over, '--out', str(cache), '--device', 'cpu']) in (None, 0)
    run = train(CFG, [*over, f'data.embeddings={cache}'], verbose=False)
    other = save_tiny_checkpoints(tmp/'other_weights', seed=1)  # DINOv2 of the same architecture, other weights
    remade = [o for o in over if not o.startswith('model.encoders.images.encoder.weights=')] + [f'model.encoders.images.encoder.weights={other["dinov2"]}']
    assert main(['embed', CFG, *remade, '--out', str(cache), '--device', 'cpu']) in (None, 0)
    want = rf"run {run.dir} was trained on the embedding cache {cache}, which has been re-made since: images: other encoder weights"
    with pytest.raises(SystemExit, match=want): main(['evaluate', str(run.dir)])
    with pytest.raises(StaleEmbeddingsError, match=want): evaluate(run.dir)
    with pytest.raises(StaleEmbeddingsError, match=want): diagnose(run.dir)
    with pytest.raises(StaleEmbeddingsError, match=want): Predictor.from_run(run.dir)
    assert main(['embed', CFG, *over, '--out', str(cache), '--device', 'cpu']) in (None, 0)  # re-made as it was: the same identity
    assert 0 <= evaluate(run.dir)['headline']['value'] <= 1
    text = (ck['ast']/'config.json').read_text()  # the cache as it was, but a checkpoint changed under it: serving refuses too
    (ck['ast']/'config.json').write_text(text.replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    try:
        with pytest.raises(StaleEmbeddingsError, match=r"the audio encoder of embedding cache .* now builds other weights than the cache was made with"):
            Predictor.from_run(run.dir)
    finally: (ck['ast']/'config.json').write_text(text)


def test_the_same_weights_in_another_folder_are_the_same_encoder(setup):
    "A checkpoint copied elsewhere builds the same weights: the cache accepts it, and a run trained on the cache opens after the cache is re-made from the copy"
    tmp, ck, over = setup
    moved = tmp/'moved_weights'/'dinov2'
    shutil.copytree(ck['dinov2'], moved)
    elsewhere = [o for o in over if not o.startswith('model.encoders.images.encoder.weights=')] + [f'model.encoders.images.encoder.weights={moved}']
    cache = tmp/'cache_moved'
    assert main(['embed', CFG, *over, '--out', str(cache), '--device', 'cpu']) in (None, 0)
    resolve_config(apply_overrides(load_config(CFG), [*elsewhere, f'data.embeddings={cache}']))  # the copy: accepted
    run = train(CFG, [*over, f'data.embeddings={cache}'], verbose=False)
    assert main(['embed', CFG, *elsewhere, '--out', str(cache), '--device', 'cpu']) in (None, 0)  # re-made from the copy
    assert 0 <= evaluate(run.dir)['headline']['value'] <= 1
    f = run.dir/'embedding_cache.json'  # a run stored while identities still held the checkpoint's folder opens too
    stored = json.loads(f.read_text())
    stored['identity']['images']['encoder']['weights'] = str(ck['dinov2'])
    f.write_text(json.dumps(stored))
    assert 0 <= evaluate(run.dir)['headline']['value'] <= 1


def test_cached_run_equals_the_run_with_the_frozen_encoder_in_the_loop(tmp_path):
    "Same seed, same epochs, nothing augmented: training on the cache gives the in-loop run's losses and metrics (tiny frozen DINOv2)"
    from mmfusion.embed import embed
    from mmfusion.encoders import TINY_DINOV2
    dino = json.dumps({'name': 'image_set', 'encoder': {'name': 'dinov2', 'config': TINY_DINOV2, 'freeze': True}, 'aggregation': 'attention'})
    over = [f'data.root={ROOT/"data"}', f'runs_dir={tmp_path/"runs"}', 'training.epochs=3', 'training.progress=false',
            'training.tensorboard=false', f'model.encoders.images={dino}']
    cfg = str(ROOT/'configs'/'weld.yaml')
    embed(cfg, tmp_path/'cache', over, device='cpu', progress=False)
    loop, cached = train(cfg, over, verbose=False), train(cfg, [*over, f'data.embeddings={tmp_path/"cache"}'], verbose=False)
    assert cached.config['model']['encoders']['images']['encoder'] == {'name': 'precomputed', 'in_dim': TINY_DINOV2['hidden_size']}
    for a, b in zip(loop.history, cached.history): assert abs(a['train_loss'] - b['train_loss']) < 1e-4, (a, b)
    for k, v in loop.metrics['test'].items(): assert abs(v - cached.metrics['test'][k]) < 1e-4, (k, v, cached.metrics['test'][k])


def test_augmenting_a_cached_modality_is_refused(setup):
    tmp, _, over = setup
    with pytest.raises(ValueError, match=r"data.augment would augment \['video', 'images', 'audio'\]"):
        resolve_config(apply_overrides(load_config(CFG), [*over, f'data.embeddings={tmp/"cache"}', 'data.augment=[{name: HorizontalFlip, p: 0.5}]']))
    resolve_config(apply_overrides(load_config(CFG), [*over, f'data.embeddings={tmp/"cache"}',
                                                     'data.augment={transforms: [{name: HorizontalFlip}], modalities: [sensors]}']))
