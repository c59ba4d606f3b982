"""One FeatureService per consumer."""
from feast import FeatureService

from item import item_stats
from onerec.features.schema import ONLINE_SERVICE, TRAINING_SERVICE
from user import user_aggregates, user_sequence

recommender_online = FeatureService(name=ONLINE_SERVICE, features=[user_sequence, user_aggregates],
                                    description="what the predictor reads per request")
training = FeatureService(name=TRAINING_SERVICE, features=[user_sequence, user_aggregates, item_stats],
                          description="point-in-time features for the retrain pipeline")
