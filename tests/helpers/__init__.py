"""What several test modules share: models, samples, reference code and CLI runs.

Test modules import from here, never from one another, so running or moving one test file never
depends on another's contents.
"""
