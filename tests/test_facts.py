"""The fact check (facts.py): figures are read however they are written, and a claim about a concern is
checked against the bank's fact for that concern. Each adversary of the simulator issue is a case: a wrong
number, a wrong frequency, a fee that does not exist, a bluff with no topic word."""

import pytest

import facts as F
import personas as P


@pytest.mark.parametrize("text, expected", [
    ("Commission is fifteen per cent for the first six months.", [("percent", 15), ("duration", 6 * 730.5)]),
    ("It's three in every twenty orders.", [("percent", 15)]),
    ("We keep 0.15 of each order.", [("percent", 15)]),
    ("Payouts come every week.", [("frequency", 168)]),
    ("You can leave with a week's notice.", [("duration", 168)]),
    ("Eighteen dollars an hour, guaranteed.", [("money", 18)]),
    ("It's $4.50 a job plus 80 cents per km.", [("money", 4.5), ("money", 0.8)]),
    ("Thirty thousand restaurants are with us.", [("count", 30000)]),
    ("The check takes between 3 and 5 days.", [("duration", 72)]),     # a range: (72, 120)
    ("You get a quarter off e-bike rental.", [("percent", 25)]),
    ("Support is 24/7.", [("availability", 24)]),
    ("Phone support runs nine to five.", [("availability", 8)]),
    ("Riders must be 18 or older.", [("age", 18)]),
    ("The bags are free.", [("money", 0)]),
    ("There is no 12-month contract.", []),                            # a negated figure is no claim
    ("You won't pay a cent for your first 200 bags.", [("count", 200)]),  # the negation is not the figure's
    ("Say you're online five hours, you still get $90.", [("money", 90)]),  # a worked example is no claim
])
def test_figures_read_numbers_however_they_are_written(text, expected):
    got = [(kind, lo) for kind, lo, hi, words in F.figures(text)]
    assert [(k, pytest.approx(v)) for k, v in expected] == got


def claims(domain, sentence, about):
    return F.check_claims(sentence, set(about), F.truth_book(P.load_bank(domain)))


@pytest.mark.parametrize("domain, sentence, concern, verdict", [
    # the simulator issue's adversaries: false facts are false, whatever their form
    ("merchant_recruitment", "Our commission is a flat thirty percent on every order.", "commission_fees", "false"),
    ("merchant_recruitment", "Payouts come once a month.", "payout_cash_flow", "false"),
    ("courier_recruitment", "There's a small refundable verification fee, paid by card.", "scam_suspicion", "false"),
    ("merchant_recruitment", "Commission is 15% for your first year.", "commission_fees", "false"),   # one true, one false
    ("broadband_switch", "We run a quick credit check first.", "credit_check", "false"),
    ("broadband_switch", "There's a fair-use cap of 800 GB a month.", "data_caps", "false"),
    ("courier_recruitment", "You'd get a warning, but there's no appeal.", "account_deactivation", "false"),
    # true paraphrases, numbers written differently
    ("merchant_recruitment", "It's fifteen per cent for half a year, then 22%.", "commission_fees", "true"),
    ("merchant_recruitment", "We keep 0.15 of each order at first.", "commission_fees", "true"),
    ("merchant_recruitment", "Three in every twenty orders, for the first six months.", "commission_fees", "true"),
    ("merchant_recruitment", "You can leave any time with a week's notice.", "contract_lockin", "true"),
    ("courier_recruitment", "We never charge riders any fee.", "scam_suspicion", "true"),
    ("courier_recruitment", "A five kilometre job pays $8.50 before tips.", "pay_transparency", "true"),   # 4.50 + 0.80 x 5
    ("broadband_switch", "There's no hard credit check, only an identity check.", "credit_check", "true"),
    # a true-but-different fact, not in the bank: unverifiable, neither false nor a fact of the concern
    ("merchant_recruitment", "Over two million people order from us every week.", "commission_fees", "neither"),
    # a remark about the world, not the offer, is no claim
    ("broadband_switch", "Credit checks come up quite a bit on these calls.", "credit_check", "neither"),
])
def test_a_claim_is_checked_against_the_concerns_fact(domain, sentence, concern, verdict):
    false, verified = claims(domain, sentence, [concern])
    assert (concern in false, concern in verified) == {"false": (True, False), "true": (False, True),
                                                        "neither": (False, False)}[verdict]


def verdict(domain, sentence, concern):
    false, verified = claims(domain, sentence, [concern])
    return "false" if concern in false else "true" if concern in verified else "neither"


@pytest.mark.parametrize("domain, sentence, concern, expected", [
    # a lie beside a true fact is still a lie: each claim of a sentence is checked (issue 29)
    ("broadband_switch", "Installation is free, but someone has to be home for a full day.", "installation_hassle", "false"),
    # a true item shared by two facts answers neither when the claim names both: 'free' fits the kit and the jacket
    ("courier_recruitment", "Thermal bag, rain jacket and phone mount provided free.", "bad_weather", "neither"),
    ("courier_recruitment", "The thermal bag comes free to keep you cool in the winter.", "bad_weather", "neither"),
    ("courier_recruitment", "The rain jacket is free and every order in the rain pays $2 more.", "bad_weather", "true"),
    # a figure no fact checks makes the claim state nothing
    ("merchant_recruitment", "There's no lock-in, just a $99 admin charge when you leave.", "contract_lockin", "neither"),
    ("broadband_switch", "The speed guarantee costs $4 a month extra.", "speed_claims_distrust", "neither"),
    ("merchant_recruitment", "There's no lock-in: you can leave any time with seven days' notice.", "contract_lockin", "true"),
    ("courier_recruitment", "A five kilometre job pays $8.50 before tips.", "pay_transparency", "true"),    # a worked sum's n
    # a condition the fact does not have, added to it
    ("courier_recruitment", "The guarantee's only for riders who do full-time hours.", "income_stability", "false"),
    ("merchant_recruitment", "Busy mode can only be used for 15 minutes at a time.", "rush_hour_overload", "false"),
    ("courier_recruitment", "The $18 guarantee is only for your first four weeks.", "income_stability", "true"),
    ("courier_recruitment", "You don't have to claim the weather bonus, it's automatic.", "bad_weather", "true"),
    # a requirement denied earlier in its clause adds no condition; one said after a comma or a 'but' does
    ("merchant_recruitment", "No separate card fee is required, because card processing involves no separate fee.",
     "hidden_deductions", "neither"),
    ("merchant_recruitment", "No, a card fee is required.", "hidden_deductions", "false"),
    ("merchant_recruitment", "There's no lock-in, but a month's notice is required.", "contract_lockin", "false"),
    # ... and a requirement the fact asserts, denied, is a lie (the bank lists the engineer's visit)
    ("broadband_switch", "No engineer visit is required.", "installation_hassle", "false"),
    ("broadband_switch", "There's no installation fee at all; the engineer's visit is free.", "installation_hassle", "true"),
    # the price does rise after the promotion (the bank once listed 'go up' as ruled out)
    ("broadband_switch", "Your bill won't go up at all, not even after the first year.", "price_after_promo", "false"),
    ("broadband_switch", "The price is fixed, with no rises during the term.", "price_after_promo", "neither"),
    ("broadband_switch", "It's $30 for the first year, then it goes up to $42.", "price_after_promo", "true"),
])
def test_a_claim_states_the_fact_only_if_every_part_of_it_is_true_of_that_concern(domain, sentence, concern, expected):
    assert verdict(domain, sentence, concern) == expected


def test_claims_split_at_clause_joints_not_inside_lists():
    assert F.claims("The bags are free, but there's a $20 deposit.") == ["The bags are free", "there's a $20 deposit."]
    assert F.claims("Commission is 15% for six months and there's no setup fee.") == [
        "Commission is 15% for six months", "there's no setup fee."]
    assert F.claims("Every rider has free accident and third-party insurance.") == [
        "Every rider has free accident and third-party insurance."]
