"""Full-ranking evaluation (Recall, NDCG, Precision, MAP, Hit at K)."""
from crane_pyg.metrics.ranking import (METRIC_NAMES, FullRankingEvaluator,
                                       ranking_metrics)

__all__ = ['METRIC_NAMES', 'ranking_metrics', 'FullRankingEvaluator']
