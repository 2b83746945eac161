"""The diagnosis against planted truth: every verdict on every planted case, for each task x fusion (see nbs/06b_planted.ipynb)."""
import pytest, torch
from mmfusion.fusion import FUSIONS
from mmfusion.planted import FUSION_NAMES, PLANTED_CASES, PLANTED_TASKS, PlantedCase, PlantedRun, check_planted, train_planted

@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def wrong_rows(table):
    bad = table[~table.correct]
    return '\n' + bad[['case', 'task', 'fusion', 'subject', 'expected', 'got', 'evidence']].to_string(index=False)

def test_the_named_fusions_are_registered():
    assert set(FUSION_NAMES) <= set(FUSIONS.names)

@pytest.mark.parametrize('fusion', FUSION_NAMES)
@pytest.mark.parametrize('task', PLANTED_TASKS)
@pytest.mark.parametrize('case', ['healthy', 'roles', 'redundant', 'synergy'])
def test_verdicts_match_the_planted_truth(case, task, fusion):
    "unique/weak/copy/XOR partners contribute, noise and constant are uninformative, copies redundant, XOR complementary; healthy: no problem"
    table = check_planted(train_planted(case, task, fusion), n_boot=300)
    assert set(table.subject) == set(PLANTED_CASES[case].expected(fusion, task))
    assert table.correct.all(), wrong_rows(table)

@pytest.mark.parametrize('fusion', FUSION_NAMES)
def test_the_x1000_modality_is_flagged_by_feature_magnitude(fusion):
    table = check_planted(train_planted('scale', 'classification', fusion), n_boot=300)
    assert table.set_index('subject').loc['feature_magnitude', 'got'] == 'big flagged'
    assert table.correct.all(), wrong_rows(table)

def test_a_wrong_truth_is_caught():
    "The same run judged against swapped roles fails exactly where the roles were swapped: the comparison can fail"
    run = train_planted('roles', 'regression', 'concat')
    assert check_planted(run, n_boot=300).correct.all()
    swapped = PlantedCase('roles', {'a': 'noise', 'w': 'weak', 'n': 'unique', 'k': 'constant'})
    wrong = check_planted(PlantedRun(swapped, run.task, run.fusion, run.model, run.train, run.valid, run.history, run.seconds), n_boot=300)
    assert sorted(wrong.subject[~wrong.correct]) == ['a', 'n']
