"""InstructGPT stage 2 and 3: reward-model and PPO losses for language models.

`losses` holds the pure math (GAE, clipped PPO policy/value losses, the K-way ranking loss, KL
estimators, masked statistics, KL-coefficient controllers); import it as
`from gptjax.rlhf import losses`.
"""
