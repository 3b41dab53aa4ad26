-- placeholder: the rollouts tables (issue 14) are written by their package's owner; this
-- migration is replaced before it is used anywhere.
SELECT 1;
