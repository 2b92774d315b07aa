-- Helpers the specs share, created once in the test database by run.sh.

-- Runs a query and returns its first column as text, or 'ERROR <SQLSTATE>' when it raises:
-- isolationtester prints only an error's message, and the specs assert the SQLSTATE (the
-- message names job ids and lease tokens, which differ on every run). The error is caught
-- in a subtransaction, so whatever the query changed before raising is undone, as it
-- would be for a client whose statement failed.
CREATE FUNCTION public.iso_try(query text) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    answer text;
BEGIN
    EXECUTE query INTO answer;
    RETURN coalesce(answer, '(null)');
EXCEPTION WHEN OTHERS THEN
    RETURN 'ERROR ' || SQLSTATE;
END
$$;
GRANT EXECUTE ON FUNCTION public.iso_try(text) TO PUBLIC;
