"""The study's old name, kept so that `python -m utils.bayes_opt ...` and `from utils.bayes_opt import load_results`
go on working: the study is utils/study.py (its search spaces utils/spaces.py, its files utils/study_log.py).
(Run it with -m from the repository root: run as a file, this module would shadow the bayes_opt package.)"""
from utils.study import main
from utils.study_log import load_results

__all__ = ["load_results", "main"]

if __name__ == "__main__":
    main()
