"""A/B testing of the recommender variants, with the user (randomized by user id) as the unit of analysis."""
