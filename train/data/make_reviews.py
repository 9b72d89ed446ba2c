import json, random
ITEMS = [
 ("the Python programming language", "A general-purpose language known for readable syntax and a huge ecosystem.", "Easy to learn and read", "Libraries for almost every task", "Slower than compiled languages", 9),
 ("Rust", "A systems language that guarantees memory safety without a garbage collector.", "Catches whole classes of bugs at compile time", "Fast, predictable performance", "Steep learning curve around ownership", 8),
 ("the novel 1984 by George Orwell", "A bleak story of a man living under total state surveillance.", "Ideas that still feel current", "Memorable, chilling language", "Slow middle section", 9),
 ("a French press coffee maker", "A simple plunger brewer that steeps grounds directly in hot water.", "Rich, full-bodied coffee", "Cheap and needs no paper filters", "Leaves some sediment in the cup", 8),
 ("the film Inception", "A heist thriller set inside layered dreams.", "Inventive visual set pieces", "A tight, puzzle-like structure", "Characters feel thin", 8),
 ("electric scooters for commuting", "Small battery-powered scooters for short city trips.", "Cheap to run", "Easy to park anywhere", "Unsafe on rough roads and in rain", 6),
 ("the board game Chess", "A two-player strategy game played on an eight by eight board.", "Endless depth", "No luck involved", "Intimidating for beginners", 9),
 ("working from home", "Doing your job from your own home instead of an office.", "No commute", "More control over your day", "Harder to separate work and life", 7),
 ("a standing desk", "A desk whose height can be raised so you can work on your feet.", "Lets you change posture during the day", "Can ease back pain", "Standing all day is tiring too", 7),
 ("the Linux operating system", "A free, open-source operating system used from phones to servers.", "Stable and highly customizable", "Free of charge", "Some commercial software is missing", 8),
 ("sourdough bread", "Bread leavened with a wild yeast starter instead of commercial yeast.", "Deep, tangy flavour", "Keeps fresh for longer", "Takes days to make", 8),
 ("the Nintendo Switch", "A game console that works both on a TV and as a handheld.", "Play anywhere", "Strong first-party games", "Weak hardware compared to rivals", 8),
 ("learning to play the guitar", "Picking up an instrument that suits many styles of music.", "Portable and affordable", "Lots of free lessons online", "Sore fingertips at first", 8),
 ("the Great Gatsby", "A short novel about wealth, longing and illusion in 1920s New York.", "Beautiful prose", "Sharp portrait of an era", "Hard to like any character", 8),
 ("mechanical keyboards", "Keyboards with an individual switch under every key.", "Satisfying, precise typing", "Last for years", "Loud and expensive", 7),
 ("the city of Lisbon", "Portugal's hilly capital on the Atlantic coast.", "Great food at fair prices", "Beautiful views and old trams", "Steep streets are tiring", 9),
 ("intermittent fasting", "An eating pattern that limits meals to a fixed daily window.", "Simple to follow", "Can help with weight control", "Hard on social meals", 6),
 ("the movie Titanic", "A romance set aboard the doomed ocean liner.", "Spectacular production", "Strong lead performances", "Very long running time", 7),
 ("a robot vacuum cleaner", "A small automatic vacuum that cleans floors on a schedule.", "Saves time every day", "Reaches under furniture", "Gets stuck on cables and rugs", 7),
 ("JavaScript", "The language of the web browser, also used on servers.", "Runs everywhere", "Huge community", "Many confusing quirks", 7),
 ("the book Sapiens by Yuval Noah Harari", "A popular history of humankind from the Stone Age to today.", "Big, thought-provoking ideas", "Very readable", "Some claims are oversimplified", 7),
 ("camping in the mountains", "Sleeping outdoors in a tent away from towns.", "Fresh air and quiet", "Cheap holidays", "Weather can ruin the trip", 8),
 ("the smartphone app Duolingo", "A gamified app for learning languages in short lessons.", "Fun daily habit", "Free to start", "Little real conversation practice", 7),
 ("a cast iron skillet", "A heavy pan made of a single piece of iron.", "Holds heat very well", "Lasts for generations", "Heavy and needs seasoning", 9),
 ("the TV series Breaking Bad", "A chemistry teacher turns into a drug manufacturer.", "Gripping story", "Outstanding acting", "Slow first season", 10),
 ("remote controlled drones", "Small flying cameras controlled from the ground.", "Amazing aerial photos", "Fun to fly", "Strict rules on where to fly", 7),
 ("the programming language Go", "A simple compiled language designed at Google for servers.", "Fast builds", "Easy concurrency", "Verbose error handling", 8),
 ("electric cars", "Cars powered by batteries instead of petrol.", "Cheap to charge", "Quiet and quick", "Long charging stops on trips", 8),
 ("the game Minecraft", "A sandbox game about building with blocks.", "Unlimited creativity", "Great with friends", "Dated graphics", 9),
 ("yoga", "A practice of poses, breathing and relaxation.", "Improves flexibility", "Calms the mind", "Slow progress", 8),
 ("the novel Pride and Prejudice", "A witty story of manners and marriage in Regency England.", "Sparkling dialogue", "Memorable heroine", "Old-fashioned language", 9),
 ("noise cancelling headphones", "Headphones that cancel outside sound electronically.", "Quiet on planes and trains", "Good sound", "Expensive", 8),
 ("the city of Tokyo", "Japan's huge, clean and efficient capital.", "Amazing food", "Excellent public transport", "Crowded at rush hour", 9),
 ("vinyl records", "Music pressed into grooves on plastic discs.", "Warm sound and big artwork", "Fun to collect", "Fragile and bulky", 7),
 ("the spreadsheet program Excel", "Microsoft's widely used spreadsheet application.", "Powerful formulas", "Everyone knows it", "Large files become slow", 8),
 ("an air fryer", "A countertop oven that circulates hot air to crisp food.", "Crispy food with little oil", "Quick to heat", "Small basket", 8),
 ("the film The Godfather", "A crime family saga in postwar America.", "Iconic performances", "Masterful direction", "Very slow pace for some", 10),
 ("online university courses", "Classes taught over the internet.", "Study from anywhere", "Often cheaper", "Easy to lose motivation", 7),
 ("the e-reader Kindle", "A device for reading e-books on a paper-like screen.", "Carries thousands of books", "Battery lasts weeks", "Tied to one store", 8),
 ("running marathons", "Racing 42 kilometres on foot.", "Great sense of achievement", "Builds endurance", "Hard on the knees", 7),
 ("the language C++", "A fast, powerful language used for games and systems.", "Top performance", "Huge ecosystem", "Complex and easy to misuse", 7),
 ("houseplants", "Plants kept indoors for decoration.", "Brighten a room", "Calming to care for", "Some die easily", 8),
 ("the board game Monopoly", "A game of buying property and charging rent.", "Easy to learn", "Good for families", "Games drag on too long", 5),
 ("the movie Toy Story", "An animated film about toys that come alive.", "Charming characters", "Funny for all ages", "Early animation looks dated", 9),
 ("public libraries", "Free collections of books open to everyone.", "Free access to knowledge", "Quiet place to work", "Limited opening hours", 9),
 ("the note-taking app Notion", "An all-in-one workspace for notes and tasks.", "Very flexible", "Looks clean", "Slow with large pages", 7),
 ("tea instead of coffee", "Drinking tea as your main hot drink.", "Gentler caffeine", "Huge variety of flavours", "Less of a morning kick", 7),
 ("the video game Tetris", "A puzzle game about fitting falling blocks.", "Instantly understandable", "Endlessly replayable", "Little variety", 9),
 ("the city of Paris", "France's capital of art, food and fashion.", "World-class museums", "Beautiful streets", "Expensive and crowded", 8),
 ("smartwatches", "Wrist computers that track health and show notifications.", "Handy fitness tracking", "Quick glance at messages", "Need charging often", 7),
 ("the book The Hobbit", "A fantasy adventure about a hobbit on a quest for treasure.", "Warm, funny storytelling", "Great for all ages", "Slow start", 9),
 ("bicycles for commuting", "Riding a bike to work or school.", "Free exercise", "No traffic jams", "Unpleasant in bad weather", 8),
 ("the database SQLite", "A small SQL database stored in a single file.", "Zero setup", "Very reliable", "Not built for many writers", 9),
 ("meal kit delivery services", "Boxes of pre-portioned ingredients with recipes.", "Saves planning time", "Teaches new recipes", "Lots of packaging", 6),
 ("the film Jurassic Park", "Dinosaurs are brought back to life in a theme park.", "Groundbreaking effects", "Thrilling scenes", "Thin characters", 9),
 ("cold showers", "Finishing a shower with cold water.", "Wakes you up fast", "Costs nothing", "Unpleasant at first", 6),
 ("the text editor Vim", "A keyboard-driven text editor found on most servers.", "Very fast editing once learned", "Available everywhere", "Hard to learn", 8),
 ("the city of New York", "America's largest and busiest city.", "Endless things to do", "Great food from everywhere", "Very expensive", 8),
 ("the podcast format", "Spoken shows you download and listen to anytime.", "Learn while commuting", "Huge choice of topics", "Hard to find good episodes", 8),
 ("solar panels at home", "Panels on the roof that turn sunlight into electricity.", "Lower power bills", "Clean energy", "High upfront cost", 8),
 ("the movie Frozen", "An animated musical about two royal sisters.", "Catchy songs", "Beautiful animation", "Story is predictable", 7),
 ("Kubernetes", "A system for running containers across many machines.", "Scales well", "Large ecosystem", "Complex to operate", 7),
]
EVAL = [
 ("the city of Rome", "Italy's capital, full of ancient history.", "Incredible ruins and art", "Delicious food", "Chaotic traffic", 9),
 ("the language Java", "A statically typed language that runs on the JVM.", "Mature tooling", "Portable", "Verbose code", 7),
 ("the movie Star Wars", "A space adventure about rebels fighting an empire.", "Iconic world and music", "Fun adventure", "Stiff dialogue", 9),
 ("a slow cooker", "A pot that cooks food at low heat for hours.", "Set it and forget it", "Tender meat", "Needs planning ahead", 8),
 ("the book Dune by Frank Herbert", "A science fiction epic set on a desert planet.", "Rich world-building", "Big themes", "Dense opening chapters", 9),
 ("learning to swim as an adult", "Taking up swimming later in life.", "Great full-body exercise", "Useful safety skill", "Can feel embarrassing at first", 8),
]
PROMPTS = ["Review {x}.", "What do you think about {x}?", "Can you give me your opinion on {x}?", "Is {x} any good?",
           "Tell me about {x}.", "I'm thinking about trying {x}. Thoughts?", "Give me a short review of {x}.",
           "How would you rate {x}?"]
def answer(summary, s1, s2, w1, score):
    return (f"## Summary\n{summary}\n\n## Strengths\n- {s1}\n- {s2}\n\n## Weaknesses\n- {w1}\n\n"
            f"## Verdict\n{score}/10. " + ("Highly recommended." if score >= 9 else "Recommended." if score >= 7 else "Worth a try, with caveats."))
def write(path, items, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i, (x, *rest) in enumerate(items):
            p = PROMPTS[(i + seed) % len(PROMPTS)].format(x=x)
            p = p[0].upper() + p[1:]
            f.write(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answer(*rest)}]}) + "\n")
write("reviews.jsonl", ITEMS, 0)
write("reviews_eval.jsonl", EVAL, 3)
