"""Story-thread illustration: cast, scene planning, continuity, panels and the storybook."""
