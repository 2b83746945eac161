"Cross-cutting checks of mmfusion.encoders: every registered encoder, state-dict matching, offline errors"
import os, time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing may be downloaded
import huggingface_hub, pytest, torch, torch.nn as nn, torchvision

from mmfusion.data import tiny_dataset
from mmfusion.encoders import (ENCODERS, TINY_CONFIGS, Encoder, EncoderOutput, ImageSetEncoder, PretrainedUnavailableError, YOLOBackbone,
                               check_encoder, load_hf_model, load_state_dict_matching, load_yolo_model)


@pytest.fixture(scope='module')
def batch():
    return next(iter(tiny_dataset().loader(batch_size=4)))


def tiny_input(name, batch):
    "A small batch of the modality the tiny config of `name` takes: (x, mask)"
    inp, masks = batch['inputs'], batch['masks']
    return {
        'small_cnn': (inp['image'], None),
        'series_transformer': (inp['series'], masks['series']),
        'series_cnn': (inp['series'], masks['series']),
        'tabular_mlp': (inp['tabular'], None),
        'conv_lstm': (torch.rand(2, 4, 3, 8, 8), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()),
        'precomputed': (torch.randn(2, 3, 12), torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()),
        'image_set': (inp['image'].unflatten(0, (2, 2)), torch.tensor([[1, 1], [1, 0]]).bool()),
        'torchvision_cnn': (torch.rand(2, 1, 32, 32), None),
        'yolo_backbone': (torch.rand(2, 1, 64, 64), None),
        'hf_auto': (torch.rand(2, 3, 28, 28), None),
        'dinov2': (torch.rand(2, 3, 28, 28), None),
        'ast': (inp['audio'], None),
        'vjepa2': (torch.rand(2, 4, 3, 32, 32), None),
        'standardize': (inp['series'], masks['series']),
    }[name]


def test_every_registered_encoder_has_a_tiny_config():
    assert set(TINY_CONFIGS) == {n for n in ENCODERS.names if ENCODERS[n].__module__ == 'mmfusion.encoders'}


@pytest.mark.parametrize('name', sorted(TINY_CONFIGS))
def test_tiny_encoder_meets_the_contract(name, batch):
    "Shapes, finite output, gradients, freezing, batch size 1 in train mode when frozen"
    torch.manual_seed(0)
    enc = ENCODERS.build(TINY_CONFIGS[name])
    x, mask = tiny_input(name, batch)
    report = check_encoder(enc, x, mask)
    assert report['params_without_grad'] in ([], ['model.embeddings.mask_token']), report
    assert not enc.frozen  # check_encoder leaves the encoder as it found it


@pytest.mark.parametrize('name', ['small_cnn', 'series_cnn', 'conv_lstm', 'torchvision_cnn', 'yolo_backbone'])
def test_frozen_encoder_inside_a_training_model_keeps_bn_stats(name, batch):
    "model.train() on the parent must not put a frozen encoder (and its BatchNorm) back in train mode"
    torch.manual_seed(0)
    parent = nn.Module()
    parent.enc, parent.head = ENCODERS.build(TINY_CONFIGS[name]).freeze(), nn.Linear(4, 4)
    parent.train()
    x, mask = tiny_input(name, batch)
    stats = {n: b.clone() for n, b in parent.enc.named_buffers()}
    parent.enc(x[:1], None if mask is None else mask[:1])
    assert parent.head.training and not any(m.training for m in parent.enc.modules())
    assert all(torch.equal(b, stats[n]) for n, b in parent.enc.named_buffers())


@pytest.mark.parametrize('name', ['series_transformer', 'conv_lstm', 'tabular_mlp', 'dinov2'])
def test_same_seed_same_encoder(name, batch):
    x, mask = tiny_input(name, batch)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(ENCODERS.build(TINY_CONFIGS[name]).eval()(x, mask).pooled)
    assert torch.equal(*outs)


def test_unfreeze_reaches_inner_encoders():
    enc = ImageSetEncoder({'name': 'small_cnn', 'widths': [4]}, 'attention').freeze()
    assert enc.encoder.frozen and not any(p.requires_grad for p in enc.parameters())
    enc.unfreeze().train()
    assert not enc.encoder.frozen and enc.encoder.training and all(p.requires_grad for p in enc.parameters())


def test_image_set_concat_needs_its_number_of_views():
    enc = ImageSetEncoder({'name': 'small_cnn', 'widths': [4]}, 'concat', n_views=3)
    assert enc(torch.rand(2, 3, 3, 8, 8)).pooled.shape == (2, 4)
    with pytest.raises(ValueError, match='n_views=3'): enc(torch.rand(2, 2, 3, 8, 8))
    with pytest.raises(ValueError, match='needs n_views'): ImageSetEncoder({'name': 'small_cnn'}, 'concat')


def test_series_encoders_stay_finite_for_a_sample_with_no_real_step():
    x, mask = torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()
    for name in ('series_transformer', 'series_cnn'):
        out = ENCODERS.build(TINY_CONFIGS[name]).eval()(x, mask)
        assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


# --- state-dict matching ---------------------------------------------------------------------------------------

def small_net(n_out=3):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, n_out))


def test_matching_strips_and_adds_prefixes_and_reports_every_key():
    torch.manual_seed(0)
    src = small_net(n_out=7)
    renamed = {f'module.backbone.{k}': v for k, v in src.state_dict().items()}
    renamed['module.aux_head.weight'] = torch.zeros(2)
    dst = nn.Module(); dst.model = small_net(n_out=3); dst.extra = nn.Linear(2, 2)
    report = load_state_dict_matching(dst, renamed, verbose=False)
    assert torch.equal(dst.model[0].weight, src[0].weight) and torch.equal(dst.model[1].running_mean, src[1].running_mean)
    assert sorted(report.matched) == sorted(f'model.{k}' for k in ('0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean',
                                                                     '1.running_var', '1.num_batches_tracked'))
    assert sorted(report.missing) == ['extra.bias', 'extra.weight']
    assert report.unexpected == ['module.aux_head.weight']
    assert report.mismatched == [('model.3.weight', (7, 4), (3, 4)), ('model.3.bias', (7,), (3,))]
    assert not torch.equal(dst.model[3].bias[:3], src[3].bias[:3])  # mismatched tensors are not loaded


def test_matching_reads_nested_checkpoint_files_with_weights_only(tmp_path):
    src = small_net()
    torch.save({'epoch': 3, 'model_state_dict': src.state_dict()}, tmp_path / 'ckpt.pth')
    dst = small_net()
    report = load_state_dict_matching(dst, tmp_path / 'ckpt.pth', verbose=False)
    assert len(report.matched) == len(src.state_dict()) and not (report.missing or report.unexpected or report.mismatched)
    torch.save({'model': src}, tmp_path / 'pickled_module.pt')  # a whole pickled module: refused by weights_only
    with pytest.raises(ValueError, match='weights_only'): load_state_dict_matching(dst, tmp_path / 'pickled_module.pt')
    with pytest.raises(FileNotFoundError): load_state_dict_matching(dst, tmp_path / 'nope.pth')


def test_matching_leaves_ambiguous_keys_alone():
    dst = nn.Module(); dst.a = nn.Linear(2, 2); dst.model = nn.Module(); dst.model.a = nn.Linear(2, 2)
    report = load_state_dict_matching(dst, {'module.a.weight': torch.ones(2, 2)}, verbose=False)
    assert report.matched == [] and report.unexpected == ['module.a.weight']


def test_torchvision_weights_load_into_one_channel_backbone(tmp_path):
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(num_classes=4)
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in rgb.state_dict().items()}}, tmp_path / 'r18.pth')
    enc = ENCODERS.build({'name': 'torchvision_cnn', 'arch': 'resnet18', 'in_channels': 1, 'weights': str(tmp_path / 'r18.pth')})
    assert enc.frozen and enc.load_report.missing == [] and enc.load_report.mismatched == []
    assert torch.allclose(enc.model.conv1.weight, rgb.conv1.weight.detach().sum(1, keepdim=True))
    assert torch.equal(enc.model.layer4[1].bn2.running_var, rgb.layer4[1].bn2.running_var)
    assert not ENCODERS.build({'name': 'torchvision_cnn', 'weights': str(tmp_path / 'r18.pth'), 'freeze': False}).frozen


def test_torchvision_missing_weights_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match='never downloads'):
        ENCODERS.build({'name': 'torchvision_cnn', 'weights': '/no/such/resnet18.pth'})
    with pytest.raises(ValueError, match='families'): ENCODERS.build({'name': 'torchvision_cnn', 'arch': 'vgg11'})


# --- YOLO ----------------------------------------------------------------------------------------------------

def test_missing_local_pt_is_a_clear_error_not_a_download(tmp_path):
    t = time.time()
    for path in ('yolo11n.pt', str(tmp_path / 'best.pt')):
        with pytest.raises(FileNotFoundError, match='never downloads'):
            ENCODERS.build({'name': 'yolo_backbone', 'model': path})
    assert time.time() - t < 5 and not Path('yolo11n.pt').exists()


def test_yolo_pt_loads_into_a_thermal_backbone(tmp_path):
    torch.manual_seed(0)
    src = load_yolo_model('yolo11n.yaml', nc=1)
    torch.save({'model': src}, tmp_path / 'phase1.pt')
    enc = ENCODERS.build({'name': 'yolo_backbone', 'model': str(tmp_path / 'phase1.pt'), 'in_channels': 1})
    assert enc.frozen and enc.load_report.missing == [] and enc.load_report.mismatched == []
    assert torch.allclose(enc.model[0].conv.weight, src.model[0].conv.weight.detach().sum(1, keepdim=True))
    assert torch.equal(enc.model[10].m[0].attn.qkv.conv.weight, src.model[10].m[0].attn.qkv.conv.weight)
    det = load_yolo_model(str(tmp_path / 'phase1.pt'), in_channels=1, nc=3)  # another class count: only Detect differs
    assert det.load_report.mismatched and all(k.startswith('model.23.') for k, *_ in det.load_report.mismatched)


def test_yolo_backbone_cut_and_maps():
    enc = YOLOBackbone('yolo11n.yaml', in_channels=2)
    out = enc(torch.rand(1, 2, 96, 128))
    assert (enc.cut, enc.feature_indices, enc.map_strides) == (11, (4, 6, 10), (8, 16, 32))
    assert [tuple(m.shape) for m in out.maps] == [(1, c, 96 // s, 128 // s) for c, s in zip(enc.map_channels, enc.map_strides)]
    assert out.tokens.shape == (1, 3 * 4, enc.out_dim) and not enc.frozen
    assert YOLOBackbone('yolov8n.yaml').feature_indices == (4, 6, 9)  # read off the yaml, not hard-coded


# --- Hugging Face ----------------------------------------------------------------------------------------------

def test_offline_hub_id_fails_fast_and_says_how_to_provide_weights(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    t = time.time()
    with pytest.raises(PretrainedUnavailableError) as e:
        ENCODERS.build({'name': 'dinov2', 'pretrained': 'some-org/some-dinov2-checkpoint'})
    assert time.time() - t < 5
    msg = str(e.value)
    assert 'HF_HUB_OFFLINE=1' in msg and 'huggingface-cli download some-org/some-dinov2-checkpoint --local-dir DIR' in msg
    assert "pretrained='DIR'" in msg and 'HF_HOME' in msg
    assert isinstance(e.value, OSError)


def test_hf_local_directory_is_frozen_by_default_and_checked_for_family(tmp_path):
    torch.manual_seed(0)
    ENCODERS.build(TINY_CONFIGS['dinov2']).model.save_pretrained(tmp_path / 'dino')
    assert ENCODERS.build({'name': 'dinov2', 'pretrained': str(tmp_path / 'dino')}).frozen
    assert not ENCODERS.build({'name': 'dinov2', 'pretrained': str(tmp_path / 'dino'), 'freeze': False}).frozen
    assert ENCODERS.build({'name': 'hf_auto', 'pretrained': str(tmp_path / 'dino')}).frozen
    with pytest.raises(ValueError, match="'dinov2' model, not 'audio-spectrogram-transformer'"):
        ENCODERS.build({'name': 'ast', 'pretrained': str(tmp_path / 'dino')})
    with pytest.raises(ValueError, match='pretrained= .* or config='): load_hf_model()


def test_ast_pads_and_crops_time_to_max_length():
    torch.manual_seed(0)
    ast = ENCODERS.build(TINY_CONFIGS['ast']).eval()
    T = ast.config.max_length
    short, long = torch.randn(1, 1, 16, T - 5), torch.randn(1, 1, 16, T + 7)
    with torch.no_grad():
        assert torch.allclose(ast(short).pooled, ast(torch.nn.functional.pad(short, (0, 5))).pooled)
        assert torch.allclose(ast(long).pooled, ast(long[..., :T]).pooled)


def test_vjepa2_keeps_only_the_encoder():
    enc = ENCODERS.build(TINY_CONFIGS['vjepa2'])
    assert not any('predictor' in n for n, _ in enc.named_parameters())
    assert enc(torch.rand(1, 4, 1, 32, 32)).tokens.shape == (1, 8, enc.out_dim)  # a 1-channel video is repeated to RGB


# --- each checkpoint's own preprocessing: mmfusion's reader -> encoder input equals the processor's output (issue 19) ---
def _read(path, spec):
    from mmfusion.data import READERS
    return READERS[spec['reader']](path, **{k: v for k, v in spec.items() if k != 'reader'})


def test_reader_then_encoder_equals_the_processor_on_image_wav_and_video(tmp_path):
    import av, numpy as np, soundfile as sf
    from PIL import Image
    from mmfusion.encoders import ASTEncoder, Dinov2Encoder, VJEPA2Encoder, TINY_AST, TINY_DINOV2, TINY_VJEPA2
    rng = np.random.default_rng(1)
    dino = Dinov2Encoder(config=TINY_DINOV2)
    Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)).save(tmp_path/'a.png')
    mine = dino._model_input(_read(tmp_path/'a.png', dino.preprocessing)[None])
    assert torch.allclose(mine, dino.processor(Image.open(tmp_path/'a.png'), return_tensors='pt')['pixel_values'], atol=1e-5)
    ast = ASTEncoder(config=TINY_AST)
    sf.write(tmp_path/'a.wav', (0.2 * rng.standard_normal(12000)).astype('f4'), 16000, subtype='PCM_16')
    wave, sr = sf.read(tmp_path/'a.wav', dtype='float32')
    mine = ast._model_input(_read(tmp_path/'a.wav', ast.preprocessing)[None])
    assert torch.allclose(mine, ast.processor(wave, sampling_rate=sr, return_tensors='pt')['input_values'], atol=1e-4)
    vj = VJEPA2Encoder(config=TINY_VJEPA2)
    with av.open(str(tmp_path/'a.mp4'), 'w') as c:
        s = c.add_stream('mpeg4', rate=8); s.height, s.width, s.pix_fmt = 36, 52, 'yuv420p'
        for _ in range(7): c.mux(s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (36, 52, 3), dtype=np.uint8), format='rgb24')))
        c.mux(s.encode(None))
    with av.open(str(tmp_path/'a.mp4')) as c: frames = np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])
    frames = frames[np.linspace(0, len(frames) - 1, vj.preprocessing['num_frames']).round().astype(int)]
    mine = vj._model_input(_read(tmp_path/'a.mp4', vj.preprocessing)[None])
    assert torch.allclose(mine, vj.processor(frames, return_tensors='pt')['pixel_values_videos'], atol=1e-5)


def test_log_mel_into_ast_is_refused():
    from functools import partial
    from mmfusion.data import read_audio
    from mmfusion.encoders import ASTEncoder, TINY_AST, check_preprocessing
    ast = ASTEncoder(config=TINY_AST)
    with pytest.raises(ValueError, match="features='log_mel' where the processor makes 'fbank'"):
        check_preprocessing(ast, partial(read_audio, n_mels=16, n_frames=32, sample_rate=16000), 'audio')
    check_preprocessing(ast, partial(read_audio, n_mels=16, n_frames=32, sample_rate=16000, features='fbank'), 'audio')


def test_state_hash_is_the_weights_a_config_builds(tmp_path):
    """build_seeded + state_hash: the same config and seed give one identity whatever the global random state (and a checkpoint saved from it the
    same); another seed, one changed number of one tensor, or a changed config value under the same tensors give another"""
    from mmfusion.encoders import TINY_DINOV2, build_seeded, state_hash
    cfg = {'name': 'dinov2', 'config': TINY_DINOV2}
    torch.manual_seed(11); a = build_seeded(cfg, seed=0)
    torch.rand(3); b = build_seeded(cfg, seed=0)
    before = torch.random.get_rng_state()
    c = build_seeded(cfg, seed=1)
    assert torch.equal(before, torch.random.get_rng_state())  # the global random state is left alone
    assert state_hash(a) == state_hash(b) != state_hash(c)
    a.model.save_pretrained(tmp_path/'ck')
    loaded = ENCODERS.build({'name': 'dinov2', 'weights': str(tmp_path/'ck')})
    assert state_hash(loaded) == state_hash(a)
    with torch.no_grad(): next(loaded.model.parameters()).view(-1)[0] += 1e-4
    assert state_hash(loaded) != state_hash(a)
    eps = ENCODERS.build({'name': 'dinov2', 'weights': str(tmp_path/'ck')})
    eps.config.layer_norm_eps = 1e-3  # same tensors, other computation
    assert state_hash(eps) != state_hash(a)


@pytest.mark.slow
def test_state_hash_of_dinov2_base_takes_seconds_not_minutes():
    "The weights' identity at real size (DINOv2-base, ~86M parameters, fp32): hashed in under 5 s on one CPU thread"
    from mmfusion.encoders import REAL_CONFIGS, state_hash
    enc = ENCODERS.build({'name': 'dinov2', 'config': REAL_CONFIGS['dinov2']})
    t0 = time.perf_counter(); state_hash(enc); seconds = time.perf_counter() - t0
    assert seconds < 5, seconds
