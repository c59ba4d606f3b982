"""One FeatureService per consumer."""
from feast import FeatureService

from item import item_stats
from onerec.features.schema import ONLINE_SERVICE, TRAINING_SERVICE
from user import user_aggregates, user_sequence

# the predictor reads only the item sequence: each feature more cost every request a value to
# parse and convert (all 11 of both user views took 2.5x the lookup time, RESULTS.md)
recommender_online = FeatureService(name=ONLINE_SERVICE, features=[user_sequence[["seq_item_ids"]]],
                                    description="what the predictor reads per request")
training = FeatureService(name=TRAINING_SERVICE, features=[user_sequence, user_aggregates, item_stats],
                          description="point-in-time features for the retrain pipeline")
