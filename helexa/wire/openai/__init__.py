"""OpenAI chat and completions: helexa's internal lingua franca, and a client dialect."""
