"""smtprelay_operator: the kopf operator that runs SmtpRelay resources."""
